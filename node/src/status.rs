//! The pure core: a scan plus what was observed around it → the published `GpuNodeStatus`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use gpuvm_api::{GpuDevice, GpuNodeStatus, IommuMember, MemberRole, NvSwitch};
use gpuvm_pci::class::DeviceRole;
use gpuvm_pci::{
    Gpu, Inventory, Passthrough, PciAddress, PciDevice, VFIO_PCI_DRIVER, nvswitch_model_name,
};

/// The reason of a GPU that was listed before and is no longer on the bus.
pub const REASON_DISAPPEARED: &str = "device disappeared from the PCI bus";

/// Everything besides the scan that decides health. Gathered by [`crate::observe`]; built
/// by hand in tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observations {
    /// Whether the agent binds GPUs to `vfio-pci` (`--bind`). Only changes the wording
    /// of the "not bound" reason: an unbound GPU is unhealthy either way.
    pub binding: bool,
    /// GPUs whose group could not be bound to `vfio-pci`, with the error as a sentence.
    pub bind_errors: BTreeMap<PciAddress, String>,
    /// IOMMU groups whose VFIO device (`<dev root>/vfio/<group>`) exists.
    pub vfio_groups_present: BTreeSet<u32>,
    /// The dev root the VFIO devices were looked for under (`/dev`), for messages.
    pub dev_root: PathBuf,
    /// Reset-failure records (see [`crate::health`]): device → reason.
    pub reset_failures: BTreeMap<PciAddress, String>,
    /// Problems reading the reset-failure records, as sentences.
    pub health_problems: Vec<String>,
    /// The devices last published, so that a GPU gone from the bus stays listed.
    pub previous: Vec<GpuDevice>,
}

/// Builds the node's `GpuNodeStatus` (without heartbeat: the publisher stamps it).
///
/// Every GPU of the scan is listed, healthy only when nothing below applies (the first
/// that does is its `reason`):
/// 1. it cannot be passed through: IOMMU off, no group, or a host device or NVSwitch
///    in its group (the reason names it);
/// 2. it, or a function passed with it, has a reset-failure record;
/// 3. binding its group to `vfio-pci` failed;
/// 4. it or a function passed with it is not bound to `vfio-pci`;
/// 5. `/dev/vfio/<group>` is missing.
///
/// GPUs listed in `previous` but absent from the scan stay listed, unhealthy, with
/// [`REASON_DISAPPEARED`].
pub fn inventory_to_status(inventory: &Inventory, observations: &Observations) -> GpuNodeStatus {
    let mut devices: Vec<GpuDevice> = inventory
        .gpus
        .iter()
        .map(|gpu| describe(gpu, observations))
        .collect();
    let present: BTreeSet<&str> = devices.iter().map(|d| d.pci_address.as_str()).collect();
    let vanished: Vec<GpuDevice> = observations
        .previous
        .iter()
        .filter(|d| !present.contains(d.pci_address.as_str()))
        .map(|d| GpuDevice {
            driver: None,
            healthy: false,
            reason: Some(REASON_DISAPPEARED.to_owned()),
            ..d.clone()
        })
        .collect();
    devices.extend(vanished);
    // Fixed-width lower-case addresses: text order is address order.
    devices.sort_by(|a, b| a.pci_address.cmp(&b.pci_address));

    let healthy = devices.iter().filter(|d| d.healthy).count();
    GpuNodeStatus {
        gpu_count: count(devices.len()),
        healthy_count: count(healthy),
        devices,
        nvswitches: inventory
            .nvswitches
            .iter()
            .map(|s| s.address.to_string())
            .collect(),
        nvswitch_devices: inventory.nvswitches.iter().map(describe_nvswitch).collect(),
        iommu_enabled: inventory.iommu_enabled,
        heartbeat: None,
        message: message(inventory, observations),
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// One NVSwitch of the scan as the API describes it.
fn describe_nvswitch(device: &PciDevice) -> NvSwitch {
    NvSwitch {
        pci_address: device.address.to_string(),
        device_id: format!("{:04x}", device.device),
        model: nvswitch_model_name(device.device),
    }
}

/// One GPU of the scan as the API describes it.
fn describe(gpu: &Gpu, observations: &Observations) -> GpuDevice {
    let reason = unhealthy_reason(gpu, observations);
    GpuDevice {
        pci_address: gpu.address().to_string(),
        vendor_id: format!("{:04x}", gpu.device.vendor),
        device_id: format!("{:04x}", gpu.device.device),
        model: gpu.model.clone(),
        iommu_group: gpu.iommu_group.as_ref().map(|g| g.number),
        iommu_group_members: gpu
            .iommu_group
            .iter()
            .flat_map(|g| &g.members)
            .map(|m| IommuMember {
                pci_address: m.address.to_string(),
                role: member_role(m.role),
            })
            .collect(),
        numa_node: gpu.numa_node().and_then(|n| i32::try_from(n).ok()),
        pcie_parent: gpu
            .parent_switch
            .or_else(|| gpu.device.root_port())
            .map(|a| a.to_string()),
        driver: gpu.device.driver.clone(),
        healthy: reason.is_none(),
        reason,
    }
}

/// The API's role for a pci-classified group member. NVSwitches in a GPU's group are
/// shared fabric the host manages, so for passthrough they count as host devices.
pub fn member_role(role: DeviceRole) -> MemberRole {
    match role {
        DeviceRole::NvidiaGpu => MemberRole::Gpu,
        DeviceRole::GpuCompanion => MemberRole::Companion,
        DeviceRole::Bridge => MemberRole::Bridge,
        DeviceRole::NvSwitch | DeviceRole::HostDevice => MemberRole::Host,
    }
}

/// Why `gpu` cannot be given to a machine now; `None` when it can.
fn unhealthy_reason(gpu: &Gpu, observations: &Observations) -> Option<String> {
    let address = gpu.address();
    if let Passthrough::NotCapable { reason } = &gpu.passthrough {
        return Some(reason.clone());
    }
    // Capable implies a group; keep the fallback anyway rather than trust it blindly.
    let Some(group) = &gpu.iommu_group else {
        return Some(format!("{address} has no IOMMU group"));
    };
    let passed: Vec<&gpuvm_pci::GroupMember> = group.passed_members().collect();
    let reset_failure = std::iter::once(address)
        .chain(passed.iter().map(|m| m.address))
        .find_map(|a| observations.reset_failures.get(&a).map(|r| (a, r)));
    if let Some((failed, why)) = reset_failure {
        return Some(format!("the last reset of {failed} failed: {why}"));
    }
    if let Some(error) = observations.bind_errors.get(&address) {
        return Some(format!(
            "could not bind IOMMU group {} to vfio-pci: {error}",
            group.number
        ));
    }
    if let Some(member) = passed
        .iter()
        .find(|m| m.driver.as_deref() != Some(VFIO_PCI_DRIVER))
    {
        let sentence = gpuvm_pci::Error::NotBoundToVfio {
            address: member.address,
            driver: member.driver.clone(),
        }
        .to_string();
        return Some(if observations.binding {
            sentence
        } else {
            format!("{sentence} (binding is off: --no-bind)")
        });
    }
    if !observations.vfio_groups_present.contains(&group.number) {
        return Some(
            gpuvm_pci::Error::VfioGroupDeviceMissing {
                address,
                path: observations
                    .dev_root
                    .join("vfio")
                    .join(group.number.to_string()),
            }
            .to_string(),
        );
    }
    None
}

/// The node-wide note: no GPU, IOMMU off, and whatever could not be read.
fn message(inventory: &Inventory, observations: &Observations) -> Option<String> {
    let mut parts = Vec::new();
    if inventory.gpus.is_empty() {
        parts.push(format!(
            "no NVIDIA GPU found ({} PCI functions scanned)",
            inventory.devices_scanned
        ));
    } else if !inventory.iommu_enabled {
        parts.push(
            "the IOMMU is off, so no GPU can be passed through; enable it with \
             intel_iommu=on or amd_iommu=on on the kernel command line"
                .to_owned(),
        );
    }
    parts.extend(inventory.problems.iter().cloned());
    parts.extend(observations.health_problems.iter().cloned());
    (!parts.is_empty()).then(|| parts.join("; "))
}
