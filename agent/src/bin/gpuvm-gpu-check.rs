//! `gpuvm-gpu-check`: the NVML query of `GpuInfo`, as a dynamically linked program.
//!
//! The agent is a static binary in an initramfs; NVML is a glibc-linked shared
//! library. This helper (in the GPU image at `/usr/bin/gpuvm-gpu-check`, run by the
//! agent with `LD_LIBRARY_PATH=/usr/lib/gpuvm/nvidia`) loads it the ordinary way and
//! prints one JSON object on stdout: the report (driver version, CUDA version, per
//! GPU index, name, UUID, PCI bus id, memory), or `{"error": "<NVML's error>"}` with
//! exit status 1.

use std::process::ExitCode;

use gpuvm_agent::gpu::{CheckFailure, CheckOutput, gpu_report};

/// The error and its causes, each said once (libloading repeats dlerror's text).
fn message(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

fn main() -> ExitCode {
    let (output, code) = match gpu_report() {
        Ok(report) => (CheckOutput::Report(report), ExitCode::SUCCESS),
        Err(error) => (
            CheckOutput::Failure(CheckFailure {
                error: message(&error),
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
