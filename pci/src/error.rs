//! The crate's error type.

use std::io;
use std::path::PathBuf;

use crate::PciAddress;

/// Everything that can go wrong reading or changing PCI state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A string is not a PCI address.
    #[error("`{input}` is not a PCI address: {reason}")]
    InvalidAddress {
        /// The text that failed to parse.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A sysfs file or link could not be read.
    #[error("could not read {}", path.display())]
    Read {
        /// The file or link.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },

    /// A sysfs file holds something this crate cannot interpret.
    #[error("{} holds `{content}`, which is not {expected}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What it holds (trimmed).
        content: String,
        /// What was expected, e.g. "a hex number".
        expected: &'static str,
    },

    /// A sysfs file could not be written.
    #[error("could not write `{value}` to {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The value written, without its trailing newline.
        value: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },

    /// No PCI device has this address under the sysfs root.
    #[error("PCI device {address} does not exist ({} is missing)", path.display())]
    NoSuchDevice {
        /// The address asked for.
        address: PciAddress,
        /// The sysfs path that is missing.
        path: PathBuf,
    },

    /// The function is not an NVIDIA GPU, so this crate will not bind or pass it.
    #[error(
        "{address} ({class_name}, vendor 0x{vendor:04x}, class 0x{class:06x}) is not an NVIDIA GPU"
    )]
    NotAGpu {
        /// The device asked for.
        address: PciAddress,
        /// Its vendor id.
        vendor: u16,
        /// Its class code.
        class: u32,
        /// A readable name of its class.
        class_name: &'static str,
    },

    /// The IOMMU is off, so nothing can be passed through with VFIO.
    #[error(
        "cannot pass {address} through: the IOMMU is off ({} has no groups); \
         enable it with intel_iommu=on or amd_iommu=on on the kernel command line",
        groups_dir.display()
    )]
    IommuDisabled {
        /// The device asked for.
        address: PciAddress,
        /// The `kernel/iommu_groups` directory that is empty or missing.
        groups_dir: PathBuf,
    },

    /// The IOMMU is on, but this device is in no group.
    #[error("cannot pass {address} through: it has no IOMMU group ({} is missing)", path.display())]
    NoIommuGroup {
        /// The device asked for.
        address: PciAddress,
        /// The missing `iommu_group` link.
        path: PathBuf,
    },

    /// The GPU's IOMMU group holds a device the host uses, so the group cannot be given away.
    #[error(
        "cannot pass {address} through: its IOMMU group {group} also holds {member} \
         ({class_name}, vendor 0x{vendor:04x}, class 0x{class:06x}), a device the host uses"
    )]
    HostDeviceInGroup {
        /// The device asked for.
        address: PciAddress,
        /// The IOMMU group number.
        group: u32,
        /// The offending member.
        member: PciAddress,
        /// The member's vendor id.
        vendor: u16,
        /// The member's class code.
        class: u32,
        /// A readable name of the member's class, e.g. "Ethernet controller".
        class_name: &'static str,
    },

    /// The `vfio-pci` driver is not loaded, so binding cannot work.
    #[error("the vfio-pci driver is not loaded ({} is missing); run `modprobe vfio-pci`", path.display())]
    VfioDriverMissing {
        /// The missing driver directory.
        path: PathBuf,
    },

    /// A device of the group is not bound to `vfio-pci`.
    #[error("{address} is bound to {}, not vfio-pci", driver.as_deref().unwrap_or("no driver"))]
    NotBoundToVfio {
        /// The device.
        address: PciAddress,
        /// Its current driver, if any.
        driver: Option<String>,
    },

    /// `/dev/vfio/<group>` does not exist.
    #[error("the VFIO group device {} for {address} does not exist; is the group bound to vfio-pci?", path.display())]
    VfioGroupDeviceMissing {
        /// The device asked for.
        address: PciAddress,
        /// The missing `/dev/vfio/<group>` path.
        path: PathBuf,
    },

    /// The device offers no reset method.
    #[error("{address} cannot be reset: it has no reset method ({} is empty or missing)", path.display())]
    NoResetMethod {
        /// The device.
        address: PciAddress,
        /// The `reset_method` or `reset` file that is missing or empty.
        path: PathBuf,
    },

    /// Another holder has the device's lock.
    #[error("{address} is busy: it is locked by {holder} (lock file {})", path.display())]
    Busy {
        /// The device.
        address: PciAddress,
        /// What the lock file says about its holder.
        holder: String,
        /// The lock file.
        path: PathBuf,
    },

    /// A lock file could not be opened or locked.
    #[error("could not lock {}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
