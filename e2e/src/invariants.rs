//! What must hold however the operator is killed, restarted or doubled: no GPU in two
//! machines, allocations that match the inventory, Pods that match their machines.

use std::collections::{BTreeMap, HashMap};

use gpuvm_api::keys::{self, MODEL_ANY};
use gpuvm_api::{GpuAllocation, GpuMachine, GpuNode, MemberRole};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

/// Checks every placed machine's allocation: each `(node, PCI address)` (GPUs and
/// companions) in at most one machine; the right number of GPUs, of the requested model,
/// that exist on that node's GpuNode; companions exactly the GPU's IOMMU companions.
/// Returns how many machines are placed, or every violation found.
pub fn check_allocations(
    machines: &[GpuMachine],
    gpu_nodes: &[GpuNode],
) -> Result<usize, Vec<String>> {
    let mut errors = Vec::new();
    let mut holders: BTreeMap<(String, String), String> = BTreeMap::new();
    let inventory: HashMap<&str, &GpuNode> = gpu_nodes
        .iter()
        .map(|g| (g.spec.node_name.as_str(), g))
        .collect();
    let mut placed = 0;
    for m in machines {
        let key = format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any());
        let Some(status) = m.status.as_ref().filter(|s| s.is_placed()) else {
            continue;
        };
        placed += 1;
        let node = status.node_name.clone().unwrap_or_default();
        for device in status.devices() {
            if let Some(other) = holders.insert((node.clone(), device.clone()), key.clone()) {
                errors.push(format!(
                    "{device} on node {node} is held by both {other} and {key}"
                ));
            }
        }
        if i32::try_from(status.gpus.len()).ok() != Some(m.spec.gpu.count) {
            errors.push(format!(
                "{key} asked for {} GPUs and holds {}",
                m.spec.gpu.count,
                status.gpus.len()
            ));
        }
        let Some(gn) = inventory.get(node.as_str()) else {
            errors.push(format!("{key} is placed on {node}, which has no GpuNode"));
            continue;
        };
        let devices = gn
            .status
            .as_ref()
            .map(|s| s.devices.as_slice())
            .unwrap_or_default();
        for gpu in &status.gpus {
            let Some(dev) = devices.iter().find(|d| d.pci_address == gpu.pci_address) else {
                errors.push(format!(
                    "{key} holds {} on {node}, which has no such GPU",
                    gpu.pci_address
                ));
                continue;
            };
            if dev.model != gpu.model
                || (m.spec.gpu.model != MODEL_ANY && m.spec.gpu.model != dev.model)
            {
                errors.push(format!(
                    "{key} wants {} and holds {} ({} on the node, {} in status)",
                    m.spec.gpu.model, gpu.pci_address, dev.model, gpu.model
                ));
            }
            let mut want: Vec<&str> = dev
                .iommu_group_members
                .iter()
                .filter(|mem| mem.role == MemberRole::Companion)
                .map(|mem| mem.pci_address.as_str())
                .collect();
            want.sort_unstable();
            let mut got: Vec<&str> = gpu.companions.iter().map(String::as_str).collect();
            got.sort_unstable();
            if want != got {
                errors.push(format!(
                    "{key}: {} has companions {got:?}, its IOMMU group says {want:?}",
                    gpu.pci_address
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(placed)
    } else {
        Err(errors)
    }
}

/// The node a Pod is pinned to by its required node affinity
/// (`matchFields metadata.name In [node]`).
pub fn pinned_node(pod: &Pod) -> Option<String> {
    let term = pod
        .spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .first()?;
    let field = term
        .match_fields
        .as_ref()?
        .iter()
        .find(|f| f.key == "metadata.name" && f.operator == "In")?;
    match field.values.as_deref() {
        Some([one]) => Some(one.clone()),
        _ => None,
    }
}

/// Checks Pods against machines: each machine Pod (label `gpuvm.dev/machine`) belongs to
/// an existing placed machine, is pinned to its node and carries exactly its devices,
/// and no `(node, PCI address)` is in two live Pods. Returns every violation.
pub fn check_pods(machines: &[GpuMachine], pods: &[Pod]) -> Vec<String> {
    let mut errors = Vec::new();
    let by_name: HashMap<(String, String), &GpuMachine> = machines
        .iter()
        .map(|m| ((m.namespace().unwrap_or_default(), m.name_any()), m))
        .collect();
    let mut holders: BTreeMap<(String, String), String> = BTreeMap::new();
    for pod in pods {
        let Some(owner) = pod.labels().get(keys::LABEL_MACHINE) else {
            continue;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ns = pod.namespace().unwrap_or_default();
        let name = format!("{ns}/{}", pod.name_any());
        let node = pinned_node(pod).unwrap_or_default();
        let devices = keys::parse_devices(
            pod.annotations()
                .get(keys::ANNOTATION_DEVICES)
                .map(String::as_str)
                .unwrap_or_default(),
        );
        for d in &devices {
            if let Some(other) = holders.insert((node.clone(), d.clone()), name.clone()) {
                errors.push(format!("{d} on node {node} is in Pods {other} and {name}"));
            }
        }
        let Some(m) = by_name.get(&(ns.clone(), owner.clone())) else {
            errors.push(format!(
                "Pod {name} names machine {owner}, which does not exist"
            ));
            continue;
        };
        let Some(status) = m.status.as_ref().filter(|s| s.is_placed()) else {
            errors.push(format!(
                "Pod {name} exists but machine {owner} is not placed"
            ));
            continue;
        };
        if status.node_name.as_deref() != Some(node.as_str()) {
            errors.push(format!(
                "Pod {name} is pinned to {node:?}, machine {owner} is on {:?}",
                status.node_name
            ));
        }
        if devices != status.devices() {
            errors.push(format!(
                "Pod {name} has devices {devices:?}, machine {owner} holds {:?}",
                status.devices()
            ));
        }
    }
    errors
}

/// Checks machines against the per-node allocation records, the source of truth: every
/// placed machine's status lists exactly what the record of its node gives its uid (the
/// status mirrors the record). Returns every violation.
pub fn check_records(machines: &[GpuMachine], records: &[GpuAllocation]) -> Vec<String> {
    let by_node: HashMap<String, &GpuAllocation> =
        records.iter().map(|r| (r.name_any(), r)).collect();
    let mut errors = Vec::new();
    for m in machines {
        let Some(status) = m.status.as_ref().filter(|s| s.is_placed()) else {
            continue;
        };
        let node = status.node_name.clone().unwrap_or_default();
        let uid = m.uid().unwrap_or_default();
        let held = by_node
            .get(&node)
            .map(|r| gpuvm_api::AllocatedGpu::devices(&r.spec.holdings(&uid)))
            .unwrap_or_default();
        if held != status.devices() {
            errors.push(format!(
                "{}/{} lists {:?} on {node}, the record gives it {held:?}",
                m.namespace().unwrap_or_default(),
                m.name_any(),
                status.devices()
            ));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self, HGX_H100_GPUS, HostKind, L40S_AUDIO, L40S_GPU};
    use gpuvm_api::{AllocatedGpu, GpuMachineStatus, GpuNodeStatus};

    fn inventory() -> Vec<GpuNode> {
        [
            ("hgx-0", HostKind::HgxH100),
            ("ws-0", HostKind::L40sWorkstation),
        ]
        .into_iter()
        .map(|(name, kind)| {
            let mut gn = fixtures::gpu_node(name);
            gn.status = Some(GpuNodeStatus { ..kind.inventory() });
            gn
        })
        .collect()
    }

    fn placed(
        name: &str,
        model: &str,
        node: &str,
        gpus: &[&str],
        companions: &[&str],
    ) -> GpuMachine {
        let count = i32::try_from(gpus.len()).unwrap();
        let mut m = fixtures::machine("ns", name, model, count, "run");
        m.status = Some(GpuMachineStatus {
            node_name: Some(node.into()),
            pod_name: Some(format!("{name}-vm")),
            gpus: gpus
                .iter()
                .map(|g| AllocatedGpu {
                    pci_address: (*g).into(),
                    model: model.into(),
                    iommu_group: None,
                    numa_node: None,
                    companions: companions.iter().map(|c| (*c).to_owned()).collect(),
                })
                .collect(),
            ..GpuMachineStatus::default()
        });
        m
    }

    fn pod_for(m: &GpuMachine) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": format!("{}-vm", m.name_any()),
                "namespace": "ns",
                "labels": {"gpuvm.dev/machine": m.name_any()},
                "annotations": {"gpuvm.dev/devices": m.status.as_ref().unwrap().devices().join(",")},
            },
            "spec": {
                "containers": [],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchFields": [{
                        "key": "metadata.name", "operator": "In",
                        "values": [m.status.as_ref().unwrap().node_name.clone().unwrap()],
                    }]}]
                }}},
            },
        }))
        .unwrap()
    }

    #[test]
    fn consistent_allocations_pass() {
        let ms = vec![
            placed("a", "h100-80gb", "hgx-0", &HGX_H100_GPUS[..2], &[]),
            placed("b", "h100-80gb", "hgx-0", &HGX_H100_GPUS[2..3], &[]),
            placed("c", "l40s", "ws-0", &[L40S_GPU], &[L40S_AUDIO]),
            fixtures::machine("ns", "waiting", "l40s", 1, "run"),
        ];
        assert_eq!(check_allocations(&ms, &inventory()), Ok(3));
        let pods: Vec<Pod> = ms[..3].iter().map(pod_for).collect();
        assert_eq!(check_pods(&ms, &pods), Vec::<String>::new());
        assert_eq!(pinned_node(&pods[2]).as_deref(), Some("ws-0"));
    }

    #[test]
    fn double_allocation_and_bad_devices_are_caught() {
        let ms = vec![
            placed("a", "h100-80gb", "hgx-0", &HGX_H100_GPUS[..2], &[]),
            placed("b", "h100-80gb", "hgx-0", &HGX_H100_GPUS[1..2], &[]),
            placed("c", "l40s", "ws-0", &[L40S_GPU], &[]),
            placed("d", "h100-80gb", "hgx-0", &["0000:ff:00.0"], &[]),
            placed("e", "h100-80gb", "nowhere", &["0000:1b:00.0"], &[]),
        ];
        let errors = check_allocations(&ms, &inventory()).unwrap_err();
        let all = errors.join("\n");
        assert!(
            all.contains("0000:43:00.0 on node hgx-0 is held by both ns/a and ns/b"),
            "{all}"
        );
        assert!(all.contains("companions"), "{all}");
        assert!(all.contains("which has no such GPU"), "{all}");
        assert!(all.contains("which has no GpuNode"), "{all}");
        // The same address on different nodes is no clash.
        assert!(!all.contains("and ns/e"), "{all}");
    }

    #[test]
    fn pods_that_disagree_with_their_machine_are_caught() {
        let ms = vec![
            placed("a", "h100-80gb", "hgx-0", &HGX_H100_GPUS[..1], &[]),
            placed("b", "h100-80gb", "hgx-0", &HGX_H100_GPUS[1..2], &[]),
        ];
        let mut pa = pod_for(&ms[0]);
        let mut pb = pod_for(&ms[1]);
        pb.annotations_mut()
            .insert(keys::ANNOTATION_DEVICES.into(), HGX_H100_GPUS[0].into());
        let ghost = {
            let mut p = pod_for(&ms[0]);
            p.metadata.name = Some("ghost-vm".into());
            p.labels_mut()
                .insert(keys::LABEL_MACHINE.into(), "ghost".into());
            p.annotations_mut()
                .insert(keys::ANNOTATION_DEVICES.into(), String::new());
            p
        };
        pa.metadata.deletion_timestamp = None;
        let errors = check_pods(&ms, &[pa, pb, ghost]).join("\n");
        assert!(
            errors.contains("is in Pods ns/a-vm and ns/b-vm"),
            "{errors}"
        );
        assert!(errors.contains("machine b holds"), "{errors}");
        assert!(
            errors.contains("names machine ghost, which does not exist"),
            "{errors}"
        );
    }

    #[test]
    fn statuses_that_differ_from_the_record_are_caught() {
        let mut a = placed("a", "h100-80gb", "hgx-0", &HGX_H100_GPUS[..1], &[]);
        a.metadata.uid = Some("uid-a".into());
        let mut b = placed("b", "h100-80gb", "hgx-0", &HGX_H100_GPUS[1..2], &[]);
        b.metadata.uid = Some("uid-b".into());
        let mut record = GpuAllocation::new("hgx-0", Default::default());
        let who = |m: &GpuMachine| gpuvm_api::MachineRef {
            namespace: "ns".into(),
            name: m.name_any(),
            uid: m.uid().unwrap(),
        };
        record
            .spec
            .claim(&who(&a), &a.status.as_ref().unwrap().gpus)
            .unwrap();
        assert_eq!(
            check_records(&[a.clone()], &[record.clone()]),
            Vec::<String>::new()
        );
        let errors = check_records(&[a, b], &[record]).join("\n");
        assert!(errors.contains("ns/b lists"), "{errors}");
        assert!(!errors.contains("ns/a lists"), "{errors}");
    }
}
