//! gpuvm's PCI, IOMMU and VFIO model.
//!
//! Everything is read from, and written to, a sysfs root that is a parameter
//! ([`Sysfs`]): `/sys` in production, a fake tree in tests (feature `testing`).
//!
//! - [`scan`] lists the host's NVIDIA GPUs ([`Inventory`]) with their IOMMU group
//!   (members classified by [`DeviceRole`]), NUMA node, PCIe switch, BARs, driver
//!   and reset ability, and the NVSwitches. It never fails.
//! - [`bind_group_to_vfio`] binds a GPU's whole IOMMU group to `vfio-pci`;
//!   [`check_vfio_ready`] checks a group is ready to hand to a VM.
//! - [`reset_device`] resets a function through sysfs.
//! - [`DeviceLock`] and [`GroupLock`] keep two sandboxes on one node off one device.
//! - [`HealthRecord`] is the reset-failure record the shim writes under
//!   [`DEFAULT_HEALTH_DIR`] and the node agent reads.
//! - [`model_name`] maps NVIDIA device ids to the model names the API uses;
//!   [`nvswitch_model_name`] does the same for NVSwitches.

mod address;
pub mod class;
mod error;
pub mod health;
mod lock;
mod models;
mod scan;
mod sysfs;
#[cfg(feature = "testing")]
pub mod testing;
mod vfio;

pub use address::PciAddress;
pub use class::{DeviceRole, NVIDIA_VENDOR_ID};
pub use error::{Error, Result};
pub use health::{DEFAULT_HEALTH_DIR, HealthRecord};
pub use lock::{DEFAULT_LOCK_DIR, DeviceLock, GroupLock};
pub use models::{
    NVIDIA_MODELS, NVSWITCH_MODELS, NvSwitchModel, NvidiaModel, model_name, nvidia_model,
    nvswitch_model, nvswitch_model_name,
};
pub use scan::{Gpu, GroupMember, Inventory, IommuGroup, Passthrough, VFIO_PCI_DRIVER, scan};
pub use sysfs::{Bar, DeviceIds, PciDevice, PcieLink, Sysfs};
pub use vfio::{
    BindReport, SysfsWrite, VfioGroup, bind_group_to_vfio, check_vfio_ready, reset_device,
    vfio_group_device,
};
