//! GPU facts from the guest's NVIDIA driver through NVML.
//!
//! `nvml-wrapper` loads `libnvidia-ml.so.1` at run time, so the agent builds and runs
//! without a driver; `GpuInfo` then answers [`Error::NoGpuDriver`].

use nvml_wrapper::Nvml;

use crate::error::{Error, Result};

/// One GPU as NVML sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

#[cfg(test)]
mod tests {
    use super::*;

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
