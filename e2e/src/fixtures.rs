//! API objects modelled on real machines: the `Node` and the `GpuNode` inventory a GPU
//! host would have, and `GpuMachine`s.

use std::collections::BTreeMap;

use gpuvm_api::{
    EnvVar, GpuDevice, GpuMachine, GpuMachineSpec, GpuNode, GpuNodeSpec, GpuNodeStatus, GpuRequest,
    GuestResources, IommuMember, MemberRole, NvSwitch, PlacementStrategy, RestartPolicy, keys,
};
use k8s_openapi::api::core::v1::{Node, NodeSpec, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;
use serde_json::{Value, json};

/// Label put on every Node a test creates; machines select it, so a test only ever
/// places onto its own nodes even on a shared cluster.
pub const LABEL_RUN: &str = "gpuvm.dev/e2e-run";

/// The kinds of GPU host the fixtures model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// An HGX H100 8-GPU board (DGX H100 layout): eight SXM5 H100 80GB, four per NUMA
    /// node, two per PCIe switch, each GPU alone in its IOMMU group, four NVSwitches.
    /// The NVSwitches need a Fabric Manager, so the operator places nothing here.
    HgxH100,
    /// A server with eight H100 PCIe 80GB cards in the same PCIe layout as
    /// [`HostKind::HgxH100`] and no NVSwitch: the 8-GPU node machines are placed on.
    H100Pcie,
    /// A workstation with one L40S whose HDMI audio function shares its IOMMU group.
    L40sWorkstation,
}

/// The PCI addresses of the HGX H100's GPUs (and the H100 PCIe server's), in bus order.
pub const HGX_H100_GPUS: [&str; 8] = [
    "0000:1b:00.0",
    "0000:43:00.0",
    "0000:52:00.0",
    "0000:61:00.0",
    "0000:9d:00.0",
    "0000:c3:00.0",
    "0000:d1:00.0",
    "0000:df:00.0",
];
/// The PCI addresses of the HGX H100's NVSwitches (third generation, `10de:22a3`).
pub const HGX_H100_NVSWITCHES: [&str; 4] = [
    "0000:05:00.0",
    "0000:06:00.0",
    "0000:07:00.0",
    "0000:08:00.0",
];
/// The L40S workstation's GPU.
pub const L40S_GPU: &str = "0000:01:00.0";
/// The L40S's HDMI audio function, passed along with the GPU.
pub const L40S_AUDIO: &str = "0000:01:00.1";

impl HostKind {
    /// The model name the node agent publishes.
    pub fn model(self) -> &'static str {
        match self {
            HostKind::HgxH100 | HostKind::H100Pcie => "h100-80gb",
            HostKind::L40sWorkstation => "l40s",
        }
    }

    /// How many GPUs the host has.
    pub fn gpu_count(self) -> usize {
        match self {
            HostKind::HgxH100 | HostKind::H100Pcie => 8,
            HostKind::L40sWorkstation => 1,
        }
    }

    /// A short tag for node names.
    pub fn tag(self) -> &'static str {
        match self {
            HostKind::HgxH100 => "hgx",
            HostKind::H100Pcie => "h100",
            HostKind::L40sWorkstation => "ws",
        }
    }

    /// The inventory the node agent would publish (heartbeat left unset).
    pub fn inventory(self) -> GpuNodeStatus {
        let devices: Vec<GpuDevice> = match self {
            HostKind::HgxH100 | HostKind::H100Pcie => {
                // H100 SXM5 on the HGX board, the PCIe card in the PCIe server.
                let sxm_or_pcie = if self == HostKind::HgxH100 {
                    "2330"
                } else {
                    "2331"
                };
                HGX_H100_GPUS
                    .iter()
                    .enumerate()
                    .map(|(i, addr)| {
                        // Two GPUs per PCIe switch, four per NUMA node.
                        let switch = [
                            "0000:18:00.0",
                            "0000:50:00.0",
                            "0000:9a:00.0",
                            "0000:ce:00.0",
                        ][i / 2];
                        GpuDevice {
                            pci_address: (*addr).to_owned(),
                            vendor_id: "10de".to_owned(),
                            device_id: sxm_or_pcie.to_owned(),
                            model: "h100-80gb".to_owned(),
                            iommu_group: Some(40 + u32::try_from(i).unwrap_or(0) * 9),
                            iommu_group_members: vec![IommuMember {
                                pci_address: (*addr).to_owned(),
                                role: MemberRole::Gpu,
                            }],
                            numa_node: Some(i32::from(i >= 4)),
                            pcie_parent: Some(switch.to_owned()),
                            driver: Some("vfio-pci".to_owned()),
                            healthy: true,
                            reason: None,
                        }
                    })
                    .collect()
            }
            HostKind::L40sWorkstation => vec![GpuDevice {
                pci_address: L40S_GPU.to_owned(),
                vendor_id: "10de".to_owned(),
                device_id: "26b9".to_owned(),
                model: "l40s".to_owned(),
                iommu_group: Some(14),
                iommu_group_members: vec![
                    IommuMember {
                        pci_address: L40S_GPU.to_owned(),
                        role: MemberRole::Gpu,
                    },
                    IommuMember {
                        pci_address: L40S_AUDIO.to_owned(),
                        role: MemberRole::Companion,
                    },
                ],
                numa_node: Some(0),
                pcie_parent: Some("0000:00:01.1".to_owned()),
                driver: Some("vfio-pci".to_owned()),
                healthy: true,
                reason: None,
            }],
        };
        let count = i32::try_from(devices.len()).unwrap_or(i32::MAX);
        GpuNodeStatus {
            nvswitches: match self {
                HostKind::HgxH100 => HGX_H100_NVSWITCHES.map(str::to_owned).to_vec(),
                HostKind::H100Pcie | HostKind::L40sWorkstation => Vec::new(),
            },
            nvswitch_devices: match self {
                HostKind::HgxH100 => HGX_H100_NVSWITCHES
                    .map(|address| NvSwitch {
                        pci_address: address.to_owned(),
                        device_id: "22a3".to_owned(),
                        model: "h100-nvswitch".to_owned(),
                    })
                    .to_vec(),
                HostKind::H100Pcie | HostKind::L40sWorkstation => Vec::new(),
            },
            devices,
            iommu_enabled: true,
            gpu_count: count,
            healthy_count: count,
            heartbeat: None,
            message: None,
        }
    }
}

/// The current time as a Kubernetes `Time`.
pub fn now() -> Time {
    Time(Timestamp::now())
}

/// The `GpuNode` for node `name` (status not included: it goes through the status
/// subresource, see [`gpu_node_status_patch`]).
pub fn gpu_node(name: &str) -> GpuNode {
    GpuNode::new(
        name,
        GpuNodeSpec {
            node_name: name.to_owned(),
            unschedulable: false,
        },
    )
}

/// The merge patch for a GpuNode's status subresource: the inventory, heartbeat now.
pub fn gpu_node_status_patch(kind: HostKind) -> Value {
    let status = GpuNodeStatus {
        heartbeat: Some(now()),
        ..kind.inventory()
    };
    json!({ "status": status })
}

/// A `Node` as the node agent would leave it: labelled and tainted as a gpuvm GPU node,
/// plus the test run's label. Its Ready condition goes through the status subresource
/// ([`node_ready_patch`]).
pub fn node(name: &str, kind: HostKind, run: &str) -> Node {
    let labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_owned(), name.to_owned()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
        ("kubernetes.io/arch".to_owned(), "amd64".to_owned()),
        (keys::LABEL_GPU_NODE.to_owned(), "true".to_owned()),
        (keys::LABEL_GPU_MODEL.to_owned(), kind.model().to_owned()),
        (
            keys::LABEL_GPU_COUNT.to_owned(),
            kind.gpu_count().to_string(),
        ),
        (LABEL_RUN.to_owned(), run.to_owned()),
    ]);
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: Some(vec![Taint {
                key: keys::TAINT_GPU_NODE.to_owned(),
                value: None,
                effect: "NoSchedule".to_owned(),
                time_added: None,
            }]),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

/// The merge patch for a Node's status subresource: Ready, heartbeat now.
pub fn node_ready_patch() -> Value {
    let now = now();
    json!({
        "status": {
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "gpuvm e2e: no kubelet, Ready set by the test",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }]
        }
    })
}

/// A `GpuMachine` in `namespace` asking for `count` GPUs of `model`, restricted to the
/// nodes of test run `run`.
pub fn machine(namespace: &str, name: &str, model: &str, count: i32, run: &str) -> GpuMachine {
    let mut m = GpuMachine::new(
        name,
        GpuMachineSpec {
            image: "nvcr.io/nvidia/pytorch:24.05-py3".to_owned(),
            command: vec!["python".to_owned(), "train.py".to_owned()],
            args: vec!["--epochs".to_owned(), "3".to_owned()],
            env: vec![EnvVar {
                name: "NCCL_DEBUG".to_owned(),
                value: "INFO".to_owned(),
                ..Default::default()
            }],
            gpu: GpuRequest {
                model: model.to_owned(),
                count,
            },
            guest: GuestResources {
                cpus: 8 * count,
                memory: format!("{}Gi", 32 * count),
            },
            restart_policy: RestartPolicy::Never,
            node_selector: BTreeMap::from([(LABEL_RUN.to_owned(), run.to_owned())]),
            placement: PlacementStrategy::BinPack,
            gpu_check: gpuvm_api::GpuCheckPolicy::Required,
            ..Default::default()
        },
    );
    m.metadata.namespace = Some(namespace.to_owned());
    m
}

/// The merge patch for a machine Pod's status subresource that kubelet would write once
/// the VM booted and its container runs (`ready` as the readiness probe says).
pub fn pod_running_patch(image: &str, ready: bool) -> Value {
    let now = now();
    json!({
        "status": {
            "phase": "Running",
            "startTime": now,
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            "containerStatuses": [{
                "name": "machine",
                "image": image,
                "imageID": "",
                "ready": ready,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            }],
        }
    })
}

/// The merge patch for a machine Pod's status subresource that kubelet would write when
/// its container ended with `exit_code` after `ran_seconds`, with `message` as the
/// termination message (the log tail, under `FallbackToLogsOnError`).
pub fn pod_ended_patch(image: &str, exit_code: i32, message: &str, ran_seconds: i64) -> Value {
    let finished = Timestamp::now();
    let started = finished
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(ran_seconds))
        .unwrap_or(finished);
    json!({
        "status": {
            "phase": if exit_code == 0 { "Succeeded" } else { "Failed" },
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{
                "name": "machine",
                "image": image,
                "imageID": "",
                "ready": false,
                "started": false,
                "restartCount": 0,
                "state": {"terminated": {
                    "exitCode": exit_code,
                    "reason": if exit_code == 0 { "Completed" } else { "Error" },
                    "message": message,
                    "startedAt": Time(started),
                    "finishedAt": Time(finished),
                }},
            }],
        }
    })
}

/// The `Binding` kube-scheduler would create to put Pod `pod` on node `node`. A bound
/// Pod is deleted gracefully: it stays, with a deletionTimestamp, until its kubelet (in
/// a test, the test) confirms the VM is gone.
pub fn binding(pod: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": pod},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    };

    fn crd_schema(yaml: &str) -> JSONSchemaProps {
        let crd: CustomResourceDefinition = serde_saphyr::from_str(yaml).unwrap();
        crd.spec.versions[0]
            .schema
            .clone()
            .unwrap()
            .open_api_v3_schema
            .unwrap()
    }

    /// Checks `value` against the structural parts of `schema` that a server enforces
    /// on these objects: known fields (no pruning), types, enums and required fields.
    fn conforms(value: &Value, schema: &JSONSchemaProps, at: &str, errors: &mut Vec<String>) {
        if value.is_null() {
            if schema.nullable != Some(true) {
                errors.push(format!("{at}: null but not nullable"));
            }
            return;
        }
        let ty = schema.type_.as_deref().unwrap_or("");
        let ok = match ty {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        if !ok {
            errors.push(format!("{at}: {value} is not {ty}"));
            return;
        }
        if let Some(allowed) = &schema.enum_
            && !allowed.iter().any(|a| a.0 == *value)
        {
            errors.push(format!("{at}: {value} not in enum"));
        }
        match value {
            Value::Object(map) => {
                let props = schema.properties.clone().unwrap_or_default();
                for req in schema.required.iter().flatten() {
                    if !map.contains_key(req) {
                        errors.push(format!("{at}: lacks required {req}"));
                    }
                }
                let additional = match &schema.additional_properties {
                    Some(JSONSchemaPropsOrBool::Schema(s)) => Some(s.as_ref()),
                    _ => None,
                };
                for (k, v) in map {
                    match props.get(k).or(additional) {
                        Some(s) => conforms(v, s, &format!("{at}.{k}"), errors),
                        None if at.is_empty()
                            && ["apiVersion", "kind", "metadata"].contains(&k.as_str()) => {}
                        None => {
                            errors.push(format!("{at}.{k}: not in the schema (would be pruned)"))
                        }
                    }
                }
            }
            Value::Array(items) => {
                if let Some(JSONSchemaPropsOrArray::Schema(s)) = &schema.items {
                    for (i, v) in items.iter().enumerate() {
                        conforms(v, s, &format!("{at}[{i}]"), errors);
                    }
                }
            }
            _ => {}
        }
    }

    #[test]
    fn gpu_node_fixtures_match_the_crd_schema_and_round_trip() {
        let schema = crd_schema(include_str!("../../crds/gpunodes.gpuvm.dev.yaml"));
        for kind in [HostKind::HgxH100, HostKind::L40sWorkstation] {
            let mut gn = gpu_node("gpu-1");
            gn.status = Some(GpuNodeStatus {
                heartbeat: Some(now()),
                ..kind.inventory()
            });
            let value = serde_json::to_value(&gn).unwrap();
            let mut errors = Vec::new();
            conforms(&value, &schema, "", &mut errors);
            assert!(errors.is_empty(), "{kind:?}: {errors:#?}");
            let back: GpuNode = serde_json::from_value(value.clone()).unwrap();
            // Times travel with whole seconds, so compare what goes over the wire.
            assert_eq!(back.spec, gn.spec);
            assert_eq!(serde_json::to_value(&back).unwrap(), value);

            // The status patch carries the same inventory.
            let patch = gpu_node_status_patch(kind);
            let status: GpuNodeStatus = serde_json::from_value(patch["status"].clone()).unwrap();
            assert_eq!(status.devices, kind.inventory().devices);
            assert!(status.heartbeat.is_some());
            assert_eq!(status.devices.len(), kind.gpu_count());
        }
    }

    #[test]
    fn kubelet_patches_carry_what_the_operator_reads() {
        let running: k8s_openapi::api::core::v1::PodStatus =
            serde_json::from_value(pod_running_patch("img:1", true)["status"].clone()).unwrap();
        let c = &running.container_statuses.unwrap()[0];
        assert!(c.ready && c.state.as_ref().unwrap().running.is_some());
        let ended: k8s_openapi::api::core::v1::PodStatus =
            serde_json::from_value(pod_ended_patch("img:1", 3, "boom", 5)["status"].clone())
                .unwrap();
        assert_eq!(ended.phase.as_deref(), Some("Failed"));
        let t = ended.container_statuses.unwrap()[0]
            .state
            .clone()
            .unwrap()
            .terminated
            .unwrap();
        assert_eq!((t.exit_code, t.message.as_deref()), (3, Some("boom")));
        let ran = t.finished_at.unwrap().0.as_second() - t.started_at.unwrap().0.as_second();
        assert!((4..=6).contains(&ran), "{ran}");
        assert_eq!(binding("p", "n")["target"]["name"], "n");
    }

    #[test]
    fn hgx_layout_is_realistic() {
        let inv = HostKind::HgxH100.inventory();
        let groups: std::collections::HashSet<_> =
            inv.devices.iter().map(|d| d.iommu_group).collect();
        assert_eq!(groups.len(), 8, "one IOMMU group per GPU");
        assert_eq!(
            inv.devices
                .iter()
                .filter(|d| d.numa_node == Some(1))
                .count(),
            4
        );
        assert_eq!(inv.nvswitches.len(), 4);
        assert_eq!(inv.nvswitch_devices.len(), 4);
        let pcie = HostKind::H100Pcie.inventory();
        assert!(pcie.all_nvswitches().is_empty());
        assert_eq!(pcie.devices.len(), 8);
        assert!(pcie.devices.iter().all(|d| d.device_id == "2331"));
        let l40s = HostKind::L40sWorkstation.inventory();
        assert_eq!(
            l40s.devices[0].iommu_group_members[1].role,
            MemberRole::Companion
        );
    }

    #[test]
    fn machine_fixture_matches_the_crd_schema() {
        let schema = crd_schema(include_str!("../../crds/gpumachines.gpuvm.dev.yaml"));
        let m = machine("ns", "train", "h100-80gb", 2, "run1");
        let value = serde_json::to_value(&m).unwrap();
        let mut errors = Vec::new();
        conforms(&value, &schema, "", &mut errors);
        assert!(errors.is_empty(), "{errors:#?}");
        assert_eq!(value["spec"]["guest"]["memory"], "64Gi");
        assert_eq!(value["spec"]["nodeSelector"][LABEL_RUN], "run1");
        let back: GpuMachine = serde_json::from_value(value).unwrap();
        assert_eq!(back.spec, m.spec);
    }

    #[test]
    fn node_fixture_is_a_tainted_ready_gpu_node() {
        let n = node("gpu-1", HostKind::L40sWorkstation, "run1");
        let labels = n.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[keys::LABEL_GPU_NODE], "true");
        assert_eq!(labels[LABEL_RUN], "run1");
        let taint = &n.spec.as_ref().unwrap().taints.as_ref().unwrap()[0];
        assert_eq!(
            (taint.key.as_str(), taint.effect.as_str()),
            (keys::TAINT_GPU_NODE, "NoSchedule")
        );
        let patch = node_ready_patch();
        let status: k8s_openapi::api::core::v1::NodeStatus =
            serde_json::from_value(patch["status"].clone()).unwrap();
        let ready = &status.conditions.unwrap()[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str()),
            ("Ready", "True")
        );
        assert!(ready.last_heartbeat_time.is_some());
    }
}
