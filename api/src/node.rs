//! `GpuNode`: one node's GPU inventory, published by the node agent (`gpuvm-node`) and
//! read by the operator's scheduler.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The GPU inventory of one Kubernetes node. Named like the node it describes.
// Several printcolumns share a `type_`, which clippy mistakes for a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "gpuvm.dev",
    version = "v1alpha1",
    kind = "GpuNode",
    shortname = "gn",
    category = "gpuvm",
    status = "GpuNodeStatus",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".status.gpuCount"),
    printcolumn(
        name = "Healthy",
        type_ = "integer",
        json_path = ".status.healthyCount"
    ),
    printcolumn(name = "IOMMU", type_ = "boolean", json_path = ".status.iommuEnabled"),
    printcolumn(name = "Heartbeat", type_ = "date", json_path = ".status.heartbeat")
)]
#[serde(rename_all = "camelCase")]
pub struct GpuNodeSpec {
    /// Name of the Kubernetes Node this inventory belongs to.
    pub node_name: String,
    /// Set by an administrator to stop new machines from being placed here, without
    /// cordoning the whole Node. Machines already placed keep running.
    #[serde(default)]
    pub unschedulable: bool,
}

/// The observed inventory and health of a node's GPUs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuNodeStatus {
    /// Every NVIDIA GPU found on the node.
    #[serde(default)]
    pub devices: Vec<GpuDevice>,
    /// PCI addresses of the NVSwitches found on the node; `nvswitchDevices` has their
    /// ids and models.
    // Stays a list of strings: the API server answers 500 to a server-side apply over a
    // stored field whose type the schema changed, so every node agent's status write
    // would fail on GpuNodes published before (node/tests/e2e.rs shows the upgrade).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nvswitches: Vec<String>,
    /// The NVSwitches found on the node (NVIDIA functions of PCI class 0x0680), with
    /// device id and model. A node with NVSwitches needs NVIDIA Fabric Manager before
    /// CUDA works on its GPUs, which gpuvm cannot provide: the operator places no
    /// machine there (see `docs/nvswitch.md`). Absent from older node agents' objects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nvswitch_devices: Vec<NvSwitch>,
    /// Whether the host's IOMMU is on; without it no device can be passed through.
    #[serde(default)]
    pub iommu_enabled: bool,
    /// Number of GPUs in `devices`.
    #[serde(default)]
    pub gpu_count: i32,
    /// Number of healthy GPUs in `devices`.
    #[serde(default)]
    pub healthy_count: i32,
    /// When the node agent last refreshed this inventory. The operator stops placing
    /// machines on a node whose heartbeat is stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<Time>,
    /// A human-readable note from the node agent, e.g. why the IOMMU check failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One NVSwitch on a node: reported, never passed through.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NvSwitch {
    /// PCI address, e.g. `0000:07:00.0`.
    pub pci_address: String,
    /// PCI device id in hex, e.g. `22a3` (third generation, HGX H100/H200).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device_id: String,
    /// Model name, e.g. `h100-nvswitch`; unknown ids read `nvidia-<device id>`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
}

impl GpuNodeStatus {
    /// The node's NVSwitches: `nvswitchDevices`, or, from a node agent that published
    /// only addresses, `nvswitches` with the ids left empty.
    pub fn all_nvswitches(&self) -> Vec<NvSwitch> {
        if !self.nvswitch_devices.is_empty() {
            return self.nvswitch_devices.clone();
        }
        self.nvswitches
            .iter()
            .map(|address| NvSwitch {
                pci_address: address.clone(),
                ..NvSwitch::default()
            })
            .collect()
    }
}

/// One GPU on a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuDevice {
    /// PCI address, e.g. `0000:17:00.0`.
    pub pci_address: String,
    /// PCI vendor id in hex, e.g. `10de`.
    pub vendor_id: String,
    /// PCI device id in hex, e.g. `2330`.
    pub device_id: String,
    /// Model name, e.g. `h100-80gb`; unknown ids read `nvidia-<device id>`.
    pub model: String,
    /// IOMMU group number; absent when the IOMMU is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<u32>,
    /// Every device of the IOMMU group, this GPU included, with its role.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iommu_group_members: Vec<IommuMember>,
    /// NUMA node the device hangs off, when the host reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<i32>,
    /// PCI address of the closest upstream PCIe switch port (or root port), used to keep
    /// multi-GPU machines under one switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_parent: Option<String>,
    /// Kernel driver bound to the device, e.g. `vfio-pci` or `nvidia`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Whether the device can be given to a machine: present, bound to `vfio-pci`, and
    /// its last reset succeeded.
    pub healthy: bool,
    /// Why the device is unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One member of a GPU's IOMMU group.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IommuMember {
    /// PCI address of the member.
    pub pci_address: String,
    /// What the member is, for passthrough purposes.
    pub role: MemberRole,
}

/// The passthrough role of a device in an IOMMU group.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MemberRole {
    /// A GPU: allocated as a unit with its group.
    #[default]
    Gpu,
    /// A function of the GPU's own card (HDMI audio, USB-C controller): passed along.
    Companion,
    /// A PCIe bridge or switch port: stays with the host, harmless to the group.
    Bridge,
    /// A device the host uses (NIC, NVMe, ...): the whole group is unsafe to pass.
    Host,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nvswitches_come_with_ids_or_as_an_older_agents_bare_addresses() {
        let new: GpuNodeStatus = serde_json::from_value(json!({
            "nvswitches": ["0000:07:00.0"],
            "nvswitchDevices": [
                {"pciAddress": "0000:07:00.0", "deviceId": "22a3", "model": "h100-nvswitch"}
            ]
        }))
        .unwrap();
        let old: GpuNodeStatus =
            serde_json::from_value(json!({"nvswitches": ["0000:07:00.0", "0000:08:00.0"]}))
                .unwrap();
        let none: GpuNodeStatus = serde_json::from_value(json!({})).unwrap();
        assert_eq!(
            new.all_nvswitches(),
            [NvSwitch {
                pci_address: "0000:07:00.0".into(),
                device_id: "22a3".into(),
                model: "h100-nvswitch".into(),
            }]
        );
        let from_old = old.all_nvswitches();
        assert_eq!(from_old.len(), 2);
        assert_eq!(from_old[1].pci_address, "0000:08:00.0");
        assert!(from_old[1].device_id.is_empty() && from_old[1].model.is_empty());
        assert!(none.all_nvswitches().is_empty());
        // Empty lists are left out when written.
        let written = serde_json::to_value(&none).unwrap();
        assert!(written.get("nvswitches").is_none() && written.get("nvswitchDevices").is_none());
    }
}
