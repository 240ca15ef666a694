//! GPU facts from the guest's NVIDIA driver through NVML.
//!
//! `nvml-wrapper` loads `libnvidia-ml.so.1` at run time. The static agent cannot
//! `dlopen` the driver's (glibc-linked) libraries reliably, so in the GPU image the
//! query runs in `gpuvm-gpu-check` (`src/bin/gpuvm-gpu-check.rs`, dynamically
//! linked), which prints a [`GpuReport`] or a [`CheckFailure`] as one JSON object; the
//! agent parses it with [`parse_check_output`]. Without that helper the agent queries
//! NVML itself ([`gpu_report`]) and, without a driver, answers [`Error::NoGpuDriver`].

use nvml_wrapper::Nvml;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One GPU as NVML sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// NVML index.
    pub index: u32,
    /// Marketing name.
    pub name: String,
    /// `GPU-...` UUID.
    pub uuid: String,
    /// PCI bus id as NVML formats it.
    pub pci_bus_id: String,
    /// Total framebuffer memory.
    pub memory_total_bytes: u64,
    /// Used framebuffer memory.
    pub memory_used_bytes: u64,
}

/// The driver and its GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuReport {
    /// Kernel driver version.
    pub driver_version: String,
    /// CUDA driver version, e.g. 12040.
    pub cuda_driver_version: i32,
    /// The GPUs, by index.
    pub gpus: Vec<Gpu>,
}

/// Queries NVML.
pub fn gpu_report() -> Result<GpuReport> {
    let nvml = Nvml::init().map_err(Error::NoGpuDriver)?;
    let count = nvml.device_count().map_err(Error::Nvml)?;
    let mut gpus = Vec::new();
    for index in 0..count {
        let device = nvml.device_by_index(index).map_err(Error::Nvml)?;
        let memory = device.memory_info().map_err(Error::Nvml)?;
        gpus.push(Gpu {
            index,
            name: device.name().map_err(Error::Nvml)?,
            uuid: device.uuid().map_err(Error::Nvml)?,
            pci_bus_id: device.pci_info().map_err(Error::Nvml)?.bus_id,
            memory_total_bytes: memory.total,
            memory_used_bytes: memory.used,
        });
    }
    Ok(GpuReport {
        driver_version: nvml.sys_driver_version().map_err(Error::Nvml)?,
        cuda_driver_version: nvml.sys_cuda_driver_version().map_err(Error::Nvml)?,
        gpus,
    })
}

/// What `gpuvm-gpu-check` prints when NVML fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckFailure {
    /// NVML's error, with its causes (`There is no NVIDIA driver in the guest: ...`).
    pub error: String,
}

/// One line of `gpuvm-gpu-check` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CheckOutput {
    /// NVML answered.
    Report(GpuReport),
    /// NVML failed.
    Failure(CheckFailure),
}

/// Parses what `gpuvm-gpu-check` printed: the report, or the sentence saying why
/// there is none (NVML's error, or output that is not the expected JSON).
pub fn parse_check_output(stdout: &str) -> std::result::Result<GpuReport, String> {
    match serde_json::from_str::<CheckOutput>(stdout.trim()) {
        Ok(CheckOutput::Report(report)) => Ok(report),
        Ok(CheckOutput::Failure(failure)) => Err(failure.error),
        Err(e) => {
            let shown: String = stdout.trim().chars().take(200).collect();
            Err(format!(
                "gpuvm-gpu-check printed something that is not its JSON ({e}): {shown:?}"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_GPU: &str = r#"{"driver_version":"550.163.01","cuda_driver_version":12040,
        "gpus":[{"index":0,"name":"NVIDIA H100 80GB HBM3",
        "uuid":"GPU-4b8a1c9e-57f2-3d6a-9e0b-2f1c7d8e6a53","pci_bus_id":"00000000:01:00.0",
        "memory_total_bytes":85520809984,"memory_used_bytes":566231040}]}"#;

    /// An HGX H100 8-GPU board as NVML lists it (bus ids of a DGX H100).
    fn eight_gpus() -> String {
        let buses = ["18", "2a", "3a", "5d", "9a", "ab", "ba", "db"];
        let gpus: Vec<String> = buses
            .iter()
            .enumerate()
            .map(|(index, bus)| {
                format!(
                    r#"{{"index":{index},"name":"NVIDIA H100 80GB HBM3",
                    "uuid":"GPU-{index}f3e2a1b-8c7d-4e6f-a5b4-c3d2e1f0a9b{index}",
                    "pci_bus_id":"00000000:{}:00.0","memory_total_bytes":85520809984,
                    "memory_used_bytes":{}}}"#,
                    bus.to_uppercase(),
                    566231040 + index * 1048576
                )
            })
            .collect();
        format!(
            r#"{{"driver_version":"550.163.01","cuda_driver_version":12040,"gpus":[{}]}}"#,
            gpus.join(",")
        )
    }

    #[test]
    fn one_gpu_parses() {
        let report = parse_check_output(ONE_GPU).unwrap();
        assert_eq!(report.driver_version, "550.163.01");
        assert_eq!(report.cuda_driver_version, 12040);
        assert_eq!(
            report.gpus,
            vec![Gpu {
                index: 0,
                name: "NVIDIA H100 80GB HBM3".into(),
                uuid: "GPU-4b8a1c9e-57f2-3d6a-9e0b-2f1c7d8e6a53".into(),
                pci_bus_id: "00000000:01:00.0".into(),
                memory_total_bytes: 85_520_809_984,
                memory_used_bytes: 566_231_040,
            }]
        );
    }

    #[test]
    fn eight_gpus_parse_in_index_order() {
        let report = parse_check_output(&eight_gpus()).unwrap();
        assert_eq!(report.gpus.len(), 8);
        let indices: Vec<u32> = report.gpus.iter().map(|g| g.index).collect();
        assert_eq!(indices, (0..8).collect::<Vec<_>>());
        assert_eq!(report.gpus[7].pci_bus_id, "00000000:DB:00.0");
        assert_eq!(
            report.gpus[3].uuid,
            "GPU-3f3e2a1b-8c7d-4e6f-a5b4-c3d2e1f0a9b3"
        );
        assert!(
            report
                .gpus
                .iter()
                .all(|g| g.name == "NVIDIA H100 80GB HBM3")
        );
        // What the helper prints is what the agent reads back.
        let again = serde_json::to_string(&CheckOutput::Report(report.clone())).unwrap();
        assert_eq!(parse_check_output(&again).unwrap(), report);
    }

    #[test]
    fn an_nvml_failure_is_its_error_text() {
        let out = r#"{"error":"There is no NVIDIA driver in the guest: the NVIDIA driver is not running"}"#;
        assert_eq!(
            parse_check_output(out).unwrap_err(),
            "There is no NVIDIA driver in the guest: the NVIDIA driver is not running"
        );
    }

    #[test]
    fn malformed_output_is_refused_with_what_was_printed() {
        for bad in [
            "",
            "Segmentation fault",
            r#"{"driver_version":"550.163.01","gpus":[]}"#,
            r#"{"driver_version":"550.163.01","cuda_driver_version":"12.4","gpus":[]}"#,
            r#"{"driver_version":"550.163.01","cuda_driver_version":12040,"gpus":[{"index":0}]}"#,
            r#"[1,2,3]"#,
        ] {
            let err = parse_check_output(bad).unwrap_err();
            assert!(
                err.starts_with("gpuvm-gpu-check printed something that is not its JSON"),
                "{bad}: {err}"
            );
        }
    }

    /// On a machine without an NVIDIA driver the call fails cleanly, no panic.
    #[test]
    fn without_a_driver_the_error_says_so() {
        match gpu_report() {
            Ok(report) => assert!(!report.driver_version.is_empty()),
            Err(error) => {
                assert!(matches!(error, Error::NoGpuDriver(_)), "{error}");
                assert_eq!(error.to_string(), "There is no NVIDIA driver in the guest");
            }
        }
    }
}
