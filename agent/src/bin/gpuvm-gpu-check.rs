//! `gpuvm-gpu-check`: the NVML query of `GpuInfo`, as a dynamically linked program.
//!
//! The agent is a static binary in an initramfs; NVML is a glibc-linked shared
//! library. This helper (in the GPU image at `/usr/bin/gpuvm-gpu-check`, run by the
//! agent with `LD_LIBRARY_PATH=/usr/lib/gpuvm/nvidia`) loads it the ordinary way and
//! prints one JSON object on stdout: the report (driver version, CUDA version, per
//! GPU index, name, UUID, PCI bus id, memory), or `{"error": "<NVML's error>"}` with
//! exit status 1.

use std::process::ExitCode;

use gpuvm_agent::error::chain;
use gpuvm_agent::gpu::{CheckFailure, CheckOutput, gpu_report};

fn main() -> ExitCode {
    let (output, code) = match gpu_report() {
        Ok(report) => (CheckOutput::Report(report), ExitCode::SUCCESS),
        Err(error) => (
            CheckOutput::Failure(CheckFailure {
                error: chain(&error),
            }),
            ExitCode::FAILURE,
        ),
    };
    match serde_json::to_string(&output) {
        Ok(json) => {
            println!("{json}");
            code
        }
        Err(error) => {
            eprintln!("gpuvm-gpu-check: encoding the answer failed: {error}");
            ExitCode::from(2)
        }
    }
}
