//! Property test: no GpuMachine or GpuNode the CRD schema accepts can make the operator's
//! decision code panic, and placements it makes are always sound.
//!
//! The generators produce what the schema admits (types, enums, CEL ranges), not only
//! tidy values: arbitrary strings for addresses and models, any NUMA number, duplicate
//! devices, negative restart counts, every phase and role.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};

use gpuvm_api::{
    AllocatedGpu, EnvVar, GpuDevice, GpuMachine, GpuMachineSpec, GpuMachineStatus, GpuNode,
    GpuNodeSpec, GpuNodeStatus, GpuRequest, GuestResources, IommuMember, MachinePhase, MemberRole,
    PlacementStrategy, RestartPolicy,
};
use gpuvm_operator::scheduler::{Inventory, PlacementRequest};
use gpuvm_operator::{inventory, pod, status};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, Node,
    NodeCondition, NodeSpec, NodeStatus, Pod, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;
use proptest::strategy::ValueTree;

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9:.-]{0,16}",
        "0000:[0-9a-f]{2}:0[0-3]\\.[0-1]",
        any::<String>().prop_map(|s| s.chars().take(24).collect()),
    ]
}

fn model() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("h100-80gb".to_owned()),
        3 => Just("l40s".to_owned()),
        2 => Just("any".to_owned()),
        1 => "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?",
    ]
}

fn memory() -> impl Strategy<Value = String> {
    (
        1u32..100_000,
        prop_oneof![Just("Mi"), Just("Gi"), Just("G"), Just(""), Just("Ti")],
    )
        .prop_map(|(n, s)| format!("{n}{s}"))
}

fn role() -> impl Strategy<Value = MemberRole> {
    prop_oneof![
        Just(MemberRole::Gpu),
        Just(MemberRole::Companion),
        Just(MemberRole::Bridge),
        Just(MemberRole::Host)
    ]
}

/// Mostly well-formed devices (so placements happen), with chaos mixed in.
fn device() -> impl Strategy<Value = GpuDevice> {
    let clean = (
        0u8..=255,
        prop_oneof![Just("h100-80gb"), Just("l40s")],
        0u32..64,
        0i32..2,
        proptest::bool::weighted(0.9),
    )
        .prop_map(|(bus, model, group, numa, healthy)| {
            let addr = format!("0000:{bus:02x}:00.0");
            GpuDevice {
                pci_address: addr.clone(),
                vendor_id: "10de".into(),
                device_id: "2330".into(),
                model: model.into(),
                iommu_group: Some(group),
                iommu_group_members: vec![IommuMember {
                    pci_address: addr,
                    role: MemberRole::Gpu,
                }],
                numa_node: Some(numa),
                pcie_parent: Some(format!("0000:{:02x}:00.0", bus / 2)),
                driver: Some("vfio-pci".into()),
                healthy,
                reason: None,
            }
        });
    prop_oneof![3 => clean, 1 => chaos_device()]
}

fn chaos_device() -> impl Strategy<Value = GpuDevice> {
    (
        any_text(),
        model(),
        proptest::option::of(0u32..6),
        proptest::collection::vec((any_text(), role()), 0..4),
        proptest::option::of(any::<i32>()),
        proptest::option::of(any_text()),
        any::<bool>(),
    )
        .prop_map(
            |(addr, model, group, members, numa, parent, healthy)| GpuDevice {
                pci_address: addr,
                vendor_id: "10de".into(),
                device_id: "2330".into(),
                model,
                iommu_group: group,
                iommu_group_members: members
                    .into_iter()
                    .map(|(pci_address, role)| IommuMember { pci_address, role })
                    .collect(),
                numa_node: numa,
                pcie_parent: parent,
                driver: Some("vfio-pci".into()),
                healthy,
                reason: None,
            },
        )
}

fn gpu_node() -> impl Strategy<Value = (GpuNode, Node)> {
    (
        "[a-d]",
        proptest::collection::vec(device(), 0..10),
        proptest::bool::weighted(0.8),
        proptest::bool::weighted(0.1),
        proptest::bool::weighted(0.1),
        prop_oneof![4 => (1_999_999_900i64..2_000_000_000).prop_map(Some), 1 => proptest::option::of(0i64..2_000_000_000)],
    )
        .prop_map(|(name, devices, ready, cordoned, unschedulable, hb)| {
            let mut gn = GpuNode::new(
                &name,
                GpuNodeSpec {
                    node_name: name.clone(),
                    unschedulable,
                },
            );
            gn.status = Some(GpuNodeStatus {
                devices,
                heartbeat: hb.map(|s| Time(Timestamp::from_second(s).unwrap())),
                ..GpuNodeStatus::default()
            });
            let mut node = Node::default();
            node.metadata.name = Some(name);
            node.spec = Some(NodeSpec {
                unschedulable: Some(cordoned),
                ..NodeSpec::default()
            });
            node.status = Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "Unknown" }.into(),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            });
            (gn, node)
        })
}

fn phase() -> impl Strategy<Value = MachinePhase> {
    prop_oneof![
        Just(MachinePhase::Pending),
        Just(MachinePhase::Scheduled),
        Just(MachinePhase::Booting),
        Just(MachinePhase::Running),
        Just(MachinePhase::Succeeded),
        Just(MachinePhase::Failed),
        Just(MachinePhase::Terminating),
    ]
}

fn machine() -> impl Strategy<Value = GpuMachine> {
    (
        "[a-z]([a-z0-9-]{0,30}[a-z0-9])?",
        (model(), prop_oneof![4 => 1i32..=2, 1 => 1i32..=8], 1i32..=256, memory()),
        prop_oneof![
            Just(RestartPolicy::Never),
            Just(RestartPolicy::OnFailure),
            Just(RestartPolicy::Always)
        ],
        prop_oneof![Just(PlacementStrategy::BinPack), Just(PlacementStrategy::Spread)],
        prop_oneof![4 => Just(BTreeMap::new()), 1 => proptest::collection::btree_map("[a-z]{1,3}", "[a-z]{0,3}", 0..2)],
        proptest::option::of((
            phase(),
            proptest::option::of("[a-d]"),
            proptest::collection::vec((any_text(), model(), proptest::collection::vec(any_text(), 0..2)), 0..3),
            any::<i32>(),
            proptest::option::of(any_text()),
        )),
    )
        .prop_map(|(name, (model, count, cpus, memory), policy, placement, selector, status)| {
            let mut m = GpuMachine::new(
                &name,
                GpuMachineSpec {
                    image: "registry.example/img:1".into(),
                    command: vec!["run".into()],
                    args: vec![],
                    env: vec![EnvVar {
                        name: "A".into(),
                        value: "b".into(),
                        ..Default::default()
                    }],
                    gpu: GpuRequest { model, count },
                    guest: GuestResources { cpus, memory },
                    restart_policy: policy,
                    node_selector: selector,
                    placement,
                    gpu_check: Default::default(),
                    ..Default::default()
                },
            );
            m.metadata.namespace = Some("ns".into());
            m.metadata.uid = Some(format!("uid-{name}"));
            m.metadata.generation = Some(1);
            m.status = status.map(|(phase, node, gpus, restarts, pod_name)| GpuMachineStatus {
                phase: Some(phase),
                node_name: node,
                gpus: gpus
                    .into_iter()
                    .map(|(pci_address, model, companions)| AllocatedGpu {
                        pci_address,
                        model,
                        iommu_group: None,
                        numa_node: None,
                        companions,
                    })
                    .collect(),
                restarts,
                pod_name,
                ..GpuMachineStatus::default()
            });
            m
        })
}

fn any_pod() -> impl Strategy<Value = Option<Pod>> {
    proptest::option::of((
        prop_oneof![
            Just("Pending"),
            Just("Running"),
            Just("Succeeded"),
            Just("Failed"),
            Just("Unknown")
        ],
        proptest::option::of(any::<i32>()),
        proptest::option::of(any_text()),
        any::<bool>(),
    ))
    .prop_map(|p| {
        p.map(|(phase, exit, waiting, ready)| {
            let mut pod = Pod::default();
            pod.metadata.name = Some("p".into());
            pod.status = Some(PodStatus {
                phase: Some(phase.into()),
                container_statuses: Some(vec![ContainerStatus {
                    name: "machine".into(),
                    ready,
                    state: Some(ContainerState {
                        terminated: exit.map(|exit_code| ContainerStateTerminated {
                            exit_code,
                            ..ContainerStateTerminated::default()
                        }),
                        waiting: waiting.map(|reason| ContainerStateWaiting {
                            reason: Some(reason),
                            message: None,
                        }),
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            });
            pod
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn decisions_never_panic_and_placements_are_sound(
        fleet in proptest::collection::vec(gpu_node(), 0..5),
        machines in proptest::collection::vec(machine(), 1..6),
        pod in any_pod(),
    ) {
        let (gpu_nodes, nodes): (Vec<GpuNode>, Vec<Node>) = fleet.into_iter().unzip();
        let views = inventory::node_views(&gpu_nodes, &nodes, Timestamp::from_second(2_000_000_000).unwrap(), std::time::Duration::from_secs(120));
        for m in &machines {
            let key = inventory::machine_key(m);
            // The other machines' allocations, as the node records would hold them.
            let mut records: HashMap<String, gpuvm_api::GpuAllocation> = HashMap::new();
            for other in machines.iter().filter(|o| inventory::machine_key(o) != key) {
                if let Some(s) = other.status.as_ref().filter(|s| s.is_placed()) {
                    let node = s.node_name.clone().unwrap_or_default();
                    let record = records
                        .entry(node.clone())
                        .or_insert_with(|| gpuvm_api::GpuAllocation::new(&node, Default::default()));
                    let who = gpuvm_api::MachineRef {
                        namespace: "ns".into(),
                        name: inventory::machine_key(other),
                        uid: inventory::machine_key(other),
                    };
                    // A clash between two generated statuses is not placement's concern.
                    let _ = record.spec.claim(&who, &s.gpus);
                }
            }
            let allocations = inventory::taken(records.values(), std::iter::empty());
            let mut inv = Inventory::build(&views, &allocations);
            let request = PlacementRequest::from(&m.spec);
            let _ = inv.usage_by_model();
            match inv.place(&request) {
                Ok(p) => {
                    // Sound: the right count, one node, a healthy GPU of the model, free.
                    prop_assert_eq!(p.gpus.len(), usize::try_from(m.spec.gpu.count).unwrap());
                    let view = views.iter().find(|v| v.name == p.node).unwrap();
                    prop_assert!(view.ready && view.schedulable);
                    let taken: HashSet<String> = allocations.get(&p.node).cloned().unwrap_or_default();
                    for g in &p.gpus {
                        let dev = view.devices.iter().find(|d| d.pci_address == g.pci_address).unwrap();
                        prop_assert!(dev.healthy && dev.iommu_group.is_some());
                        prop_assert!(m.spec.gpu.model == "any" || dev.model == m.spec.gpu.model);
                        prop_assert!(!taken.contains(&g.pci_address));
                    }
                    inv.commit(&p);
                    inv.release(&p);
                }
                Err(why) => {
                    let text = why.to_string();
                    prop_assert!(text.starts_with("no node has"), "{}", text);
                    let _ = status::unschedulable(m, why.reason(), &text, &Time(Timestamp::now()));
                }
            }
            let _ = pod::build_pod(m);
            let decision = status::decide(m, pod.as_ref(), &status::Backoff::default(), &Time(Timestamp::now()));
            // Every condition carries the generation it describes.
            for c in &decision.status.conditions {
                prop_assert_eq!(c.observed_generation, Some(1));
            }
            let _ = pod::pod_name(&m.metadata.name.clone().unwrap_or_default(), decision.status.restarts);
        }
    }

    #[test]
    fn pod_names_stay_valid(name in "[a-z]([a-z0-9.-]{0,300}[a-z0-9])?", restarts in any::<i32>()) {
        let n = pod::pod_name(&name, restarts);
        prop_assert!(n.len() <= 253, "{} chars", n.len());
    }
}

#[test]
fn generators_cover_the_schema_bounds() {
    // A guard that the strategies still produce both placements and refusals, so the
    // property above keeps testing both branches.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut placed, mut refused) = (0, 0);
    for _ in 0..200 {
        let fleet = proptest::collection::vec(gpu_node(), 1..5)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let m = machine().new_tree(&mut runner).unwrap().current();
        let (gns, nodes): (Vec<_>, Vec<_>) = fleet.into_iter().unzip();
        let views = inventory::node_views(
            &gns,
            &nodes,
            Timestamp::from_second(2_000_000_000).unwrap(),
            std::time::Duration::from_secs(4_000_000_000),
        );
        match Inventory::build(&views, &BTreeMap::new()).place(&PlacementRequest::from(&m.spec)) {
            Ok(_) => placed += 1,
            Err(_) => refused += 1,
        }
    }
    assert!(
        placed > 0 && refused > 0,
        "placed {placed}, refused {refused}"
    );
}
