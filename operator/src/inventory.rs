//! Joins what the cluster says into the scheduler's input: Nodes + GpuNodes become
//! [`NodeView`]s, and the allocation records become the map of taken devices.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use gpuvm_api::{ConditionType, GpuAllocation, GpuMachine, GpuNode};
use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::scheduler::NodeView;

/// Builds one [`NodeView`] per GpuNode. A GpuNode counts as ready only when its Node
/// exists and is Ready and its heartbeat is younger than `heartbeat_timeout`; it is
/// schedulable unless the Node is cordoned or the GpuNode marked unschedulable.
pub fn node_views<'a>(
    gpu_nodes: impl IntoIterator<Item = &'a GpuNode>,
    nodes: impl IntoIterator<Item = &'a Node>,
    now: Timestamp,
    heartbeat_timeout: Duration,
) -> Vec<NodeView> {
    let nodes: HashMap<String, &Node> = nodes.into_iter().map(|n| (n.name_any(), n)).collect();
    gpu_nodes
        .into_iter()
        .map(|gn| {
            let node = nodes.get(&gn.spec.node_name).copied();
            let status = gn.status.clone().unwrap_or_default();
            let fresh = status.heartbeat.as_ref().is_some_and(|hb| {
                let age = now.duration_since(hb.0);
                age.as_secs_f64() <= heartbeat_timeout.as_secs_f64()
            });
            let node_ready = node.is_some_and(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            });
            let cordoned = node
                .and_then(|n| n.spec.as_ref())
                .and_then(|s| s.unschedulable)
                .unwrap_or(false);
            NodeView {
                name: gn.spec.node_name.clone(),
                labels: node.map(|n| n.labels().clone()).unwrap_or_default(),
                ready: node_ready && fresh,
                schedulable: !cordoned && !gn.spec.unschedulable,
                nvswitches: status.all_nvswitches(),
                devices: status.devices,
            }
        })
        .collect()
}

/// Whether a machine still holds its GPUs: it is placed, and it has not both ended and
/// lost its Pod (an ended machine keeps its devices until its VM is surely gone).
pub fn holds_gpus(machine: &GpuMachine) -> bool {
    machine.status.as_ref().is_some_and(|s| {
        s.is_placed() && !(s.phase.is_some_and(|p| p.is_terminal()) && s.pod_name.is_none())
    })
}

/// Whether a machine waits for GPUs to become free: unplaced, and refused by placement
/// (`Scheduled=False`: no node could take it, or its node was lost).
pub fn waits_for_gpus(machine: &GpuMachine) -> bool {
    machine.status.as_ref().is_some_and(|s| {
        !s.is_placed()
            && s.condition(ConditionType::Scheduled)
                .is_some_and(|c| c.status == "False")
    })
}

/// The allocation map: node → PCI addresses taken, from the allocation records (the
/// source of truth) plus claims this process has in flight (`pending`: node and devices).
pub fn taken<'a>(
    records: impl IntoIterator<Item = &'a GpuAllocation>,
    pending: impl IntoIterator<Item = &'a (String, Vec<String>)>,
) -> BTreeMap<String, HashSet<String>> {
    let mut out: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    for r in records {
        out.entry(r.name_any())
            .or_default()
            .extend(r.spec.devices.keys().cloned());
    }
    for (node, devices) in pending {
        out.entry(node.clone())
            .or_default()
            .extend(devices.iter().cloned());
    }
    out
}

/// Drops what the machine cache never reads: `managedFields`, in their parsed form
/// several times the rest of a machine, and the copy of the whole object that a
/// client-side `kubectl apply` keeps in an annotation. Status writes send only the
/// status (the server ignores the rest), and the finalizer patches only
/// `metadata.finalizers`.
pub fn trim_machine(machine: &mut GpuMachine) {
    machine.metadata.managed_fields = None;
    if let Some(annotations) = machine.metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// The annotation in which client-side `kubectl apply` keeps the applied object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops the `managedFields` of a cached object the operator only reads, or writes back
/// with an update (the server keeps the stored `managedFields` when an update has none).
pub fn trim_managed_fields<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Keeps of a cached `Node` only what placement and node-loss detection read: its name,
/// labels and creation time, whether it is cordoned, and its `Ready` condition. A real
/// Node also carries its image list, addresses, capacity, system info, annotations and
/// several other conditions (several KB each, on every node of the fleet); the operator
/// never writes a Node back.
pub fn trim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    if let Some(spec) = node.spec.as_mut() {
        *spec = NodeSpec {
            unschedulable: spec.unschedulable,
            ..NodeSpec::default()
        };
    }
    if let Some(status) = node.status.as_mut() {
        let ready = status
            .conditions
            .take()
            .map(|cs| cs.into_iter().filter(|c| c.type_ == "Ready").collect());
        *status = NodeStatus {
            conditions: ready,
            ..NodeStatus::default()
        };
    }
}

/// `namespace/name`, the key machines are tracked by.
pub fn machine_key(m: &GpuMachine) -> String {
    format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuvm_api::{GpuNodeSpec, GpuNodeStatus, MachinePhase, NvSwitch};
    use k8s_openapi::api::core::v1::{ContainerImage, NodeCondition, NodeSpec, NodeStatus, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn node(name: &str, ready: bool, cordoned: bool) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some(BTreeMap::from([("zone".into(), "a".into())]));
        n.spec = Some(NodeSpec {
            unschedulable: Some(cordoned),
            ..NodeSpec::default()
        });
        n.status = Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        });
        n
    }

    fn gpu_node(name: &str, heartbeat: i64, unschedulable: bool) -> GpuNode {
        let mut gn = GpuNode::new(
            name,
            GpuNodeSpec {
                node_name: name.into(),
                unschedulable,
            },
        );
        gn.status = Some(GpuNodeStatus {
            heartbeat: Some(Time(Timestamp::from_second(heartbeat).unwrap())),
            ..GpuNodeStatus::default()
        });
        gn
    }

    #[test]
    fn a_trimmed_node_keeps_what_placement_and_node_loss_read() {
        let mut n = node("n1", false, true);
        n.metadata.annotations = Some(BTreeMap::from([("a".into(), "b".repeat(100))]));
        let spec = n.spec.as_mut().unwrap();
        spec.taints = Some(vec![Taint::default()]);
        let status = n.status.as_mut().unwrap();
        status.images = Some(vec![ContainerImage::default()]);
        status.conditions.as_mut().unwrap().push(NodeCondition {
            type_: "MemoryPressure".into(),
            status: "False".into(),
            ..NodeCondition::default()
        });
        let mut trimmed = n.clone();
        trim_node(&mut trimmed);
        assert_eq!(trimmed.metadata.annotations, None);
        assert_eq!(trimmed.metadata.labels, n.metadata.labels);
        assert_eq!(trimmed.spec.as_ref().unwrap().unschedulable, Some(true));
        assert_eq!(trimmed.spec.as_ref().unwrap().taints, None);
        let status = trimmed.status.as_ref().unwrap();
        assert_eq!(status.images, None);
        let types: Vec<&str> = status
            .conditions
            .iter()
            .flatten()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(types, ["Ready"]);
        // What the views and the node-loss verdict say is unchanged.
        let now = Timestamp::from_second(1_000_000).unwrap();
        let policy = crate::node_loss::Policy::default();
        let gn = gpu_node("n1", 1_000_000, false);
        assert_eq!(
            crate::node_loss::judge(Some(&trimmed), Some(&gn), now, &policy),
            crate::node_loss::judge(Some(&n), Some(&gn), now, &policy)
        );
        let view = |node: &Node| {
            let v = node_views([&gn], [node], now, Duration::from_secs(60));
            (v[0].ready, v[0].schedulable, v[0].labels.clone())
        };
        assert_eq!(view(&trimmed), view(&n));
    }

    #[test]
    fn readiness_and_schedulability_come_from_node_and_heartbeat() {
        let now = Timestamp::from_second(10_000).unwrap();
        let gns = [
            gpu_node("ok", 9_990, false),
            gpu_node("stale", 1_000, false),
            gpu_node("notready", 9_990, false),
            gpu_node("cordoned", 9_990, false),
            gpu_node("admin-off", 9_990, true),
            gpu_node("no-node", 9_990, false),
        ];
        let nodes = [
            node("ok", true, false),
            node("stale", true, false),
            node("notready", false, false),
            node("cordoned", true, true),
            node("admin-off", true, false),
        ];
        let views = node_views(&gns, &nodes, now, Duration::from_secs(120));
        let got: Vec<(&str, bool, bool)> = views
            .iter()
            .map(|v| (v.name.as_str(), v.ready, v.schedulable))
            .collect();
        assert_eq!(
            got,
            vec![
                ("ok", true, true),
                ("stale", false, true),
                ("notready", false, true),
                ("cordoned", true, false),
                ("admin-off", true, false),
                ("no-node", false, true),
            ]
        );
        assert_eq!(views[0].labels["zone"], "a");
    }

    #[test]
    fn nvswitches_reach_the_view_from_new_and_older_node_agents() {
        let now = Timestamp::from_second(10_000).unwrap();
        let mut new = gpu_node("new", 9_990, false);
        let mut old = gpu_node("old", 9_990, false);
        if let Some(s) = new.status.as_mut() {
            s.nvswitches = vec!["0000:07:00.0".into()];
            s.nvswitch_devices = vec![NvSwitch {
                pci_address: "0000:07:00.0".into(),
                device_id: "22a3".into(),
                model: "h100-nvswitch".into(),
            }];
        }
        if let Some(s) = old.status.as_mut() {
            s.nvswitches = vec!["0000:07:00.0".into(), "0000:08:00.0".into()];
        }
        let nodes = [node("new", true, false), node("old", true, false)];
        let views = node_views(&[new, old], &nodes, now, Duration::from_secs(120));
        assert_eq!(views[0].nvswitches[0].model, "h100-nvswitch");
        let old_addresses: Vec<&str> = views[1]
            .nvswitches
            .iter()
            .map(|s| s.pci_address.as_str())
            .collect();
        assert_eq!(old_addresses, ["0000:07:00.0", "0000:08:00.0"]);
    }

    fn machine(name: &str, phase: MachinePhase, pod: Option<&str>) -> GpuMachine {
        let gpu = crate::fixtures::l40s(
            &format!("0000:{name}:00.0"),
            &[&format!("0000:{name}:00.1")],
        );
        let mut m = crate::fixtures::placed(name, vec![gpu]);
        m.metadata.namespace = Some("ns".into());
        if let Some(s) = m.status.as_mut() {
            s.phase = Some(phase);
            s.pod_name = pod.map(str::to_owned);
        }
        m
    }

    #[test]
    fn trimming_keeps_everything_but_managed_fields() {
        let mut m = machine("01", MachinePhase::Running, Some("01-vm"));
        m.metadata.managed_fields = Some(vec![Default::default()]);
        m.metadata.finalizers = Some(vec!["gpuvm.dev/release-gpus".into()]);
        m.metadata.annotations = Some(BTreeMap::from([
            (LAST_APPLIED.to_owned(), "{...}".to_owned()),
            ("team".to_owned(), "ml".to_owned()),
        ]));
        let before = m.clone();
        trim_machine(&mut m);
        assert!(m.metadata.managed_fields.is_none());
        assert_eq!(
            m.metadata.annotations,
            Some(BTreeMap::from([("team".to_owned(), "ml".to_owned())]))
        );
        assert_eq!(m.metadata.finalizers, before.metadata.finalizers);
        assert_eq!(m.status, before.status);
        assert_eq!(m.spec, before.spec);
    }

    #[test]
    fn ended_machines_without_a_pod_hold_nothing() {
        assert!(holds_gpus(&machine(
            "01",
            MachinePhase::Running,
            Some("01-vm")
        )));
        assert!(holds_gpus(&machine(
            "02",
            MachinePhase::Succeeded,
            Some("02-vm")
        )));
        assert!(!holds_gpus(&machine("03", MachinePhase::Succeeded, None)));
    }

    #[test]
    fn only_machines_placement_refused_wait_for_gpus() {
        let now = Time(Timestamp::from_second(0).unwrap());
        let placed = machine("01", MachinePhase::Running, Some("01-vm"));
        let mut fresh = placed.clone();
        fresh.status = None;
        let mut refused = fresh.clone();
        refused.status = Some(crate::status::unschedulable(
            &fresh,
            "Unschedulable",
            "no node has 1 free l40s",
            &now,
        ));
        assert!(!waits_for_gpus(&placed));
        assert!(
            !waits_for_gpus(&fresh),
            "a new machine has its own watch event"
        );
        assert!(waits_for_gpus(&refused));
    }

    #[test]
    fn taken_devices_come_from_the_records_and_pending_claims() {
        let m = machine("01", MachinePhase::Running, Some("01-vm"));
        let mut record = GpuAllocation::new("n1", Default::default());
        record
            .spec
            .claim(
                &gpuvm_api::MachineRef {
                    namespace: "ns".into(),
                    name: "01".into(),
                    uid: "u1".into(),
                },
                &m.status.unwrap().gpus,
            )
            .unwrap();
        let pending = [("n2".to_owned(), vec!["0000:05:00.0".to_owned()])];
        let map = taken([&record], pending.iter());
        let mut n1: Vec<&str> = map["n1"].iter().map(String::as_str).collect();
        n1.sort();
        assert_eq!(n1, vec!["0000:01:00.0", "0000:01:00.1"]);
        assert!(map["n2"].contains("0000:05:00.0"));
    }
}
