//! Classification of PCI functions by vendor and class code.
//!
//! These are pure functions of the ids, so that the rules that decide what may
//! be handed to a guest are easy to read and to test.

use serde::{Deserialize, Serialize};

use crate::PciAddress;

/// NVIDIA's PCI vendor id.
pub const NVIDIA_VENDOR_ID: u16 = 0x10de;

/// What a PCI function is, as far as passing GPUs through is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceRole {
    /// An NVIDIA display or 3D controller (class 0x0300 or 0x0302).
    NvidiaGpu,
    /// Another function in a GPU's slot from the GPU's vendor (HDMI audio, USB-C, …):
    /// it goes to the guest with its GPU.
    GpuCompanion,
    /// A PCI bridge or PCIe port (class 0x0604 or 0x0609): left alone, never bound.
    Bridge,
    /// An NVIDIA NVSwitch (class 0x0680): recognized and reported, not passed through yet.
    NvSwitch,
    /// Anything else (NIC, NVMe, …): the host's, so a group holding one is unsafe to pass.
    HostDevice,
}

/// Whether vendor and class make an NVIDIA GPU (VGA 0x0300xx or 3D controller 0x0302xx).
pub fn is_nvidia_gpu(vendor: u16, class: u32) -> bool {
    vendor == NVIDIA_VENDOR_ID && matches!(class >> 8, 0x0300 | 0x0302)
}

/// Whether vendor and class make an NVIDIA NVSwitch ("other bridge", 0x0680xx).
pub fn is_nvswitch(vendor: u16, class: u32) -> bool {
    vendor == NVIDIA_VENDOR_ID && class >> 8 == 0x0680
}

/// Whether the class is a PCI-to-PCI bridge or PCIe port (0x0604xx, or semi-transparent 0x0609xx).
pub fn is_bridge(class: u32) -> bool {
    matches!(class >> 8, 0x0604 | 0x0609)
}

/// The role of a function judged alone, without the GPUs around it.
///
/// A function that is neither a GPU, an NVSwitch nor a bridge is a host device here;
/// [`classify_in_group`] turns it into a [`DeviceRole::GpuCompanion`] when it sits in
/// a GPU's slot.
pub fn classify(vendor: u16, class: u32) -> DeviceRole {
    if is_nvidia_gpu(vendor, class) {
        DeviceRole::NvidiaGpu
    } else if is_nvswitch(vendor, class) {
        DeviceRole::NvSwitch
    } else if is_bridge(class) {
        DeviceRole::Bridge
    } else {
        DeviceRole::HostDevice
    }
}

/// The role of a function within its IOMMU group.
///
/// `gpus` are the addresses of the group's NVIDIA GPUs. A function that is not
/// itself a GPU, bridge or NVSwitch, from NVIDIA, in the same slot as one of them,
/// is that GPU's companion (HDMI audio 0x0403, USB 0x0c03, UCSI 0x0c80).
pub fn classify_in_group(
    address: &PciAddress,
    vendor: u16,
    class: u32,
    gpus: &[PciAddress],
) -> DeviceRole {
    match classify(vendor, class) {
        DeviceRole::HostDevice
            if vendor == NVIDIA_VENDOR_ID && gpus.iter().any(|gpu| gpu.same_slot(address)) =>
        {
            DeviceRole::GpuCompanion
        }
        role => role,
    }
}

/// A readable name for a class code, for messages (`"Ethernet controller"`).
pub fn class_name(class: u32) -> &'static str {
    match class >> 8 {
        0x0100 => "SCSI storage controller",
        0x0101 => "IDE interface",
        0x0104 => "RAID bus controller",
        0x0106 => "SATA controller",
        0x0107 => "Serial Attached SCSI controller",
        0x0108 => "Non-Volatile memory controller",
        0x0200 => "Ethernet controller",
        0x0207 => "InfiniBand controller",
        0x0280 => "Network controller",
        0x0300 => "VGA compatible controller",
        0x0302 => "3D controller",
        0x0380 => "Display controller",
        0x0403 => "Audio device",
        0x0600 => "Host bridge",
        0x0601 => "ISA bridge",
        0x0604 => "PCI bridge",
        0x0609 => "Semi-transparent PCI-to-PCI bridge",
        0x0680 => "Bridge",
        0x0800..=0x08ff => "System peripheral",
        0x0c03 => "USB controller",
        0x0c05 => "SMBus",
        0x0c80 => "Serial bus controller",
        0x1200 => "Processing accelerators",
        _ => match class >> 16 {
            0x01 => "Mass storage controller",
            0x02 => "Network controller",
            0x03 => "Display controller",
            0x04 => "Multimedia controller",
            0x06 => "Bridge",
            0x0c => "Serial bus controller",
            _ => "PCI device",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_vendor_and_class() {
        let cases: &[(u16, u32, DeviceRole)] = &[
            (0x10de, 0x030200, DeviceRole::NvidiaGpu),
            (0x10de, 0x030000, DeviceRole::NvidiaGpu),
            (0x10de, 0x068000, DeviceRole::NvSwitch),
            (0x10de, 0x040300, DeviceRole::HostDevice),
            (0x1002, 0x030000, DeviceRole::HostDevice),
            (0x8086, 0x030000, DeviceRole::HostDevice),
            (0x1000, 0x060400, DeviceRole::Bridge),
            (0x10b5, 0x060400, DeviceRole::Bridge),
            (0x8086, 0x060000, DeviceRole::HostDevice),
            (0x1234, 0x068000, DeviceRole::HostDevice),
            (0x15b3, 0x020000, DeviceRole::HostDevice),
            (0x144d, 0x010802, DeviceRole::HostDevice),
        ];
        for &(vendor, class, role) in cases {
            assert_eq!(classify(vendor, class), role, "{vendor:04x} {class:06x}");
        }
    }

    #[test]
    fn companion_needs_same_vendor_and_same_slot() {
        let gpu = PciAddress::parse("0000:01:00.0").unwrap();
        let audio = PciAddress::parse("0000:01:00.1").unwrap();
        let elsewhere = PciAddress::parse("0000:02:00.1").unwrap();
        assert_eq!(
            classify_in_group(&audio, 0x10de, 0x040300, &[gpu]),
            DeviceRole::GpuCompanion
        );
        assert_eq!(
            classify_in_group(&audio, 0x8086, 0x040300, &[gpu]),
            DeviceRole::HostDevice
        );
        assert_eq!(
            classify_in_group(&elsewhere, 0x10de, 0x040300, &[gpu]),
            DeviceRole::HostDevice
        );
        assert_eq!(
            classify_in_group(&audio, 0x10de, 0x040300, &[]),
            DeviceRole::HostDevice
        );
        assert_eq!(
            classify_in_group(&gpu, 0x10de, 0x030200, &[gpu]),
            DeviceRole::NvidiaGpu
        );
    }

    #[test]
    fn names_classes_for_messages() {
        assert_eq!(class_name(0x020000), "Ethernet controller");
        assert_eq!(class_name(0x010802), "Non-Volatile memory controller");
        assert_eq!(class_name(0x040300), "Audio device");
        assert_eq!(class_name(0x020700), "InfiniBand controller");
        assert_eq!(class_name(0x0101ff), "IDE interface");
        assert_eq!(class_name(0x01ff00), "Mass storage controller");
        assert_eq!(class_name(0xff0000), "PCI device");
    }
}
