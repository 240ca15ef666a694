//! The GPU inventory of a host.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::class::{DeviceRole, class_name, classify_in_group, is_nvidia_gpu, is_nvswitch};
use crate::{Error, PciAddress, PciDevice, Result, Sysfs, model_name};

/// The name of the driver that GPUs are bound to for passthrough.
pub const VFIO_PCI_DRIVER: &str = "vfio-pci";

/// What a scan found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    /// NVIDIA GPUs, sorted by address.
    pub gpus: Vec<Gpu>,
    /// NVIDIA NVSwitches, sorted by address. Reported, not passed through.
    pub nvswitches: Vec<PciDevice>,
    /// Whether the IOMMU is on (`kernel/iommu_groups` has groups).
    pub iommu_enabled: bool,
    /// How many PCI functions the scan looked at.
    pub devices_scanned: usize,
    /// What could not be read, one sentence each. The rest of the inventory is still valid.
    pub problems: Vec<String>,
}

/// One NVIDIA GPU and what decides whether and how it can be passed through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gpu {
    /// The GPU function itself.
    pub device: PciDevice,
    /// The model name the API uses (`h100-80gb`), or `nvidia-<id>` when unknown.
    pub model: String,
    /// Its IOMMU group with every member classified; `None` when the IOMMU is off.
    pub iommu_group: Option<IommuGroup>,
    /// Other functions of the GPU's slot in its group (HDMI audio, …): passed with it.
    pub companions: Vec<PciAddress>,
    /// The upstream port of the PCIe switch the GPU sits behind, if any.
    pub parent_switch: Option<PciAddress>,
    /// Whether the GPU can be passed through, and why not.
    pub passthrough: Passthrough,
}

impl Gpu {
    /// The GPU's address.
    pub fn address(&self) -> PciAddress {
        self.device.address
    }

    /// The GPU's NUMA node.
    pub fn numa_node(&self) -> Option<u32> {
        self.device.numa_node
    }

    /// Whether the GPU function itself is bound to `vfio-pci`.
    pub fn bound_to_vfio(&self) -> bool {
        self.device.driver.as_deref() == Some(VFIO_PCI_DRIVER)
    }

    /// Whether the GPU and every function passed with it are bound to `vfio-pci`.
    pub fn group_bound_to_vfio(&self) -> bool {
        match &self.iommu_group {
            Some(group) => group
                .passed_members()
                .all(|member| member.driver.as_deref() == Some(VFIO_PCI_DRIVER)),
            None => false,
        }
    }
}

/// Whether a GPU can be handed to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum Passthrough {
    /// Its group is safe to pass whole.
    Capable,
    /// It cannot be passed; `reason` says why in a sentence.
    NotCapable {
        /// Why not.
        reason: String,
    },
}

impl Passthrough {
    /// Whether the GPU can be passed through.
    pub fn is_capable(&self) -> bool {
        matches!(self, Passthrough::Capable)
    }
}

/// An IOMMU group: the unit the IOMMU isolates, so the unit a VM gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IommuGroup {
    /// The group number (`/sys/kernel/iommu_groups/<number>`, `/dev/vfio/<number>`).
    pub number: u32,
    /// Its functions, sorted by address.
    pub members: Vec<GroupMember>,
}

impl IommuGroup {
    /// Reads group `number` and classifies its members.
    pub fn read(sysfs: &Sysfs, number: u32) -> Result<Self> {
        let addresses = sysfs.iommu_group_members(number)?;
        let mut members = Vec::with_capacity(addresses.len());
        for address in addresses {
            let ids = sysfs.ids(&address)?;
            members.push((address, ids, sysfs.driver(&address)?));
        }
        let gpus: Vec<PciAddress> = members
            .iter()
            .filter(|(_, ids, _)| is_nvidia_gpu(ids.vendor, ids.class))
            .map(|(address, _, _)| *address)
            .collect();
        let members = members
            .into_iter()
            .map(|(address, ids, driver)| GroupMember {
                address,
                vendor: ids.vendor,
                device: ids.device,
                class: ids.class,
                driver,
                role: classify_in_group(&address, ids.vendor, ids.class, &gpus),
            })
            .collect();
        Ok(Self { number, members })
    }

    /// The members that go to the guest: GPUs and their companions (never bridges).
    pub fn passed_members(&self) -> impl Iterator<Item = &GroupMember> {
        self.members.iter().filter(|member| {
            matches!(
                member.role,
                DeviceRole::NvidiaGpu | DeviceRole::GpuCompanion
            )
        })
    }

    /// The first member that makes the group unsafe to give away: a host device or an NVSwitch.
    pub fn blocker(&self) -> Option<&GroupMember> {
        self.members
            .iter()
            .find(|member| matches!(member.role, DeviceRole::HostDevice | DeviceRole::NvSwitch))
    }

    /// Checks that the group can be passed whole for `gpu`.
    pub fn check_passable(&self, gpu: &PciAddress) -> Result<()> {
        match self.blocker() {
            Some(member) => Err(Error::HostDeviceInGroup {
                address: *gpu,
                group: self.number,
                member: member.address,
                vendor: member.vendor,
                class: member.class,
                class_name: class_name(member.class),
            }),
            None => Ok(()),
        }
    }
}

/// One function of an IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    /// Its address.
    pub address: PciAddress,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code.
    pub class: u32,
    /// Its bound driver.
    pub driver: Option<String>,
    /// What it is, within this group.
    pub role: DeviceRole,
}

/// Scans the host for NVIDIA GPUs and NVSwitches. Never fails.
///
/// What cannot be read is listed in [`Inventory::problems`]; with the IOMMU off,
/// the GPUs are still listed, marked not passthrough-capable.
pub fn scan(sysfs: &Sysfs) -> Inventory {
    let iommu_enabled = sysfs.iommu_enabled();
    let mut inventory = Inventory {
        gpus: Vec::new(),
        nvswitches: Vec::new(),
        iommu_enabled,
        devices_scanned: 0,
        problems: Vec::new(),
    };
    let addresses = match sysfs.list_devices() {
        Ok(addresses) => addresses,
        Err(err) => {
            inventory.problems.push(error_sentence(&err));
            return inventory;
        }
    };
    inventory.devices_scanned = addresses.len();

    let mut groups: HashMap<u32, Result<IommuGroup, String>> = HashMap::new();
    for address in &addresses {
        // Only NVIDIA functions need the full read: the cheap look first.
        let ids = match sysfs.ids(address) {
            Ok(ids) => ids,
            Err(err) => {
                inventory.problems.push(error_sentence(&err));
                continue;
            }
        };
        let gpu = is_nvidia_gpu(ids.vendor, ids.class);
        if !gpu && !is_nvswitch(ids.vendor, ids.class) {
            continue;
        }
        let device = match sysfs.device(address) {
            Ok(device) => device,
            Err(err) => {
                inventory.problems.push(error_sentence(&err));
                continue;
            }
        };
        if !gpu {
            inventory.nvswitches.push(device);
            continue;
        }
        let group = device.iommu_group.map(|number| {
            groups
                .entry(number)
                .or_insert_with(|| IommuGroup::read(sysfs, number).map_err(|e| error_sentence(&e)))
                .clone()
        });
        inventory
            .gpus
            .push(describe_gpu(sysfs, iommu_enabled, device, group));
    }
    inventory
}

fn describe_gpu(
    sysfs: &Sysfs,
    iommu_enabled: bool,
    device: PciDevice,
    group: Option<Result<IommuGroup, String>>,
) -> Gpu {
    let address = device.address;
    let (iommu_group, passthrough) = match group {
        _ if !iommu_enabled => (
            None,
            not_capable(&Error::IommuDisabled {
                address,
                groups_dir: sysfs.iommu_groups_dir(),
            }),
        ),
        None => (
            None,
            not_capable(&Error::NoIommuGroup {
                address,
                path: sysfs.device_dir(&address).join("iommu_group"),
            }),
        ),
        Some(Err(reason)) => (None, Passthrough::NotCapable { reason }),
        Some(Ok(group)) => {
            let passthrough = match group.check_passable(&address) {
                Ok(()) => Passthrough::Capable,
                Err(err) => not_capable(&err),
            };
            (Some(group), passthrough)
        }
    };
    let companions = iommu_group
        .iter()
        .flat_map(|group| &group.members)
        .filter(|m| m.role == DeviceRole::GpuCompanion && m.address.same_slot(&address))
        .map(|m| m.address)
        .collect();
    Gpu {
        model: model_name(device.device),
        parent_switch: device.parent_switch(),
        device,
        iommu_group,
        companions,
        passthrough,
    }
}

fn not_capable(err: &Error) -> Passthrough {
    Passthrough::NotCapable {
        reason: error_sentence(err),
    }
}

/// An error and its sources as one sentence.
fn error_sentence(err: &Error) -> String {
    let mut sentence = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        sentence.push_str(": ");
        sentence.push_str(&cause.to_string());
        source = cause.source();
    }
    sentence
}
