//! Table-driven placement tests over node layouts modelled on real machines.

use super::*;
use gpuvm_api::IommuMember;

fn member(addr: &str, role: MemberRole) -> IommuMember {
    IommuMember {
        pci_address: addr.into(),
        role,
    }
}

fn gpu(addr: &str, model: &str, group: u32, numa: i32, switch: &str) -> GpuDevice {
    GpuDevice {
        pci_address: addr.into(),
        vendor_id: "10de".into(),
        device_id: "2330".into(),
        model: model.into(),
        iommu_group: Some(group),
        iommu_group_members: vec![member(addr, MemberRole::Gpu)],
        numa_node: Some(numa),
        pcie_parent: Some(switch.into()),
        driver: Some("vfio-pci".into()),
        healthy: true,
        reason: None,
    }
}

/// Eight H100s laid out like an HGX board's PCIe side: two NUMA nodes, four PCIe
/// switches of two GPUs each. No NVSwitches are listed; [`with_nvswitches`] adds them.
fn hgx(name: &str) -> NodeView {
    let buses = ["18", "2a", "3a", "5d", "9a", "ab", "ba", "db"];
    let devices = buses
        .iter()
        .enumerate()
        .map(|(i, bus)| {
            let i32_i = i32::try_from(i).unwrap();
            gpu(
                &format!("0000:{bus}:00.0"),
                "h100-80gb",
                u32::try_from(i).unwrap() + 10,
                i32_i / 4,
                &format!("0000:{:02x}:00.0", 0x10 + i32_i / 2),
            )
        })
        .collect();
    node(name, devices)
}

fn node(name: &str, devices: Vec<GpuDevice>) -> NodeView {
    NodeView {
        name: name.into(),
        labels: BTreeMap::from([("kubernetes.io/hostname".into(), name.into())]),
        ready: true,
        schedulable: true,
        devices,
        nvswitches: Vec::new(),
    }
}

/// `view` with the four third-generation NVSwitches of an HGX H100 board.
fn with_nvswitches(mut view: NodeView) -> NodeView {
    view.nvswitches = ["06", "07", "08", "09"]
        .map(|bus| NvSwitch {
            pci_address: format!("0000:{bus}:00.0"),
            device_id: "22a3".into(),
            model: "h100-nvswitch".into(),
        })
        .to_vec();
    view
}

const FABRIC_WHY: &str = ": CUDA on an NVSwitch baseboard needs NVIDIA Fabric Manager, which gpuvm \
     cannot run (no Debian package; see docs/nvswitch.md), so no machine is placed there";

/// A workstation with one L40S whose HDMI audio function shares its IOMMU group.
fn l40s_workstation(name: &str) -> NodeView {
    let mut g = gpu("0000:01:00.0", "l40s", 12, 0, "0000:00:01.0");
    g.iommu_group_members = vec![
        member("0000:00:01.0", MemberRole::Bridge),
        member("0000:01:00.0", MemberRole::Gpu),
        member("0000:01:00.1", MemberRole::Companion),
    ];
    node(name, vec![g])
}

fn request(model: &str, count: u32) -> PlacementRequest {
    PlacementRequest {
        model: model.into(),
        count,
        node_selector: BTreeMap::new(),
        strategy: PlacementStrategy::BinPack,
    }
}

fn no_allocations() -> BTreeMap<String, HashSet<String>> {
    BTreeMap::new()
}

fn taken(node: &str, addrs: &[&str]) -> BTreeMap<String, HashSet<String>> {
    BTreeMap::from([(
        node.to_owned(),
        addrs.iter().map(|s| (*s).to_owned()).collect(),
    )])
}

fn addrs(p: &Placement) -> Vec<&str> {
    p.gpus.iter().map(|g| g.pci_address.as_str()).collect()
}

#[test]
fn companion_functions_travel_with_their_gpu_and_bridges_stay() {
    let p = place_machine(
        &request("l40s", 1),
        &[l40s_workstation("ws")],
        &no_allocations(),
    )
    .unwrap();
    assert_eq!(p.node, "ws");
    assert_eq!(p.gpus[0].companions, vec!["0000:01:00.1"]);
    assert_eq!(p.devices(), vec!["0000:01:00.0", "0000:01:00.1"]);
    assert_eq!(p.gpus[0].iommu_group, Some(12));
}

#[test]
fn a_group_shared_with_a_nic_is_never_used() {
    let mut shared = gpu("0000:3b:00.0", "a100-40gb", 40, 0, "0000:3a:00.0");
    shared.iommu_group_members = vec![
        member("0000:3b:00.0", MemberRole::Gpu),
        member("0000:3b:00.1", MemberRole::Host),
    ];
    let clean = gpu("0000:5e:00.0", "a100-40gb", 41, 0, "0000:5d:00.0");
    let n = node("board", vec![shared, clean]);

    let p = place_machine(
        &request("a100-40gb", 1),
        std::slice::from_ref(&n),
        &no_allocations(),
    )
    .unwrap();
    assert_eq!(addrs(&p), vec!["0000:5e:00.0"]);

    let err = place_machine(&request("a100-40gb", 2), &[n], &no_allocations()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no node has 2 free healthy a100-40gb GPUs (1 node checked: 1 GPUs share an IOMMU group with a host device)"
    );
}

#[test]
fn multi_gpu_prefers_one_switch_then_one_numa_node() {
    let n = hgx("hgx");
    // Two GPUs: one switch.
    let p = place_machine(
        &request("h100-80gb", 2),
        std::slice::from_ref(&n),
        &no_allocations(),
    )
    .unwrap();
    assert_eq!(addrs(&p), vec!["0000:18:00.0", "0000:2a:00.0"]);

    // Break every switch on NUMA 0 by taking one GPU of each; NUMA 1 is whole.
    let allocs = taken("hgx", &["0000:18:00.0", "0000:3a:00.0"]);
    let p = place_machine(&request("h100-80gb", 2), std::slice::from_ref(&n), &allocs).unwrap();
    // A whole switch on NUMA 1 beats two half switches on NUMA 0.
    assert_eq!(addrs(&p), vec!["0000:9a:00.0", "0000:ab:00.0"]);

    // Four GPUs: one NUMA node (the whole of NUMA 1).
    let p = place_machine(&request("h100-80gb", 4), std::slice::from_ref(&n), &allocs).unwrap();
    assert!(p.gpus.iter().all(|g| g.numa_node == Some(1)), "{p:?}");

    // Five GPUs can't fit one NUMA node: the emptier NUMA node is used first.
    let p = place_machine(&request("h100-80gb", 5), std::slice::from_ref(&n), &allocs).unwrap();
    assert_eq!(p.gpus.iter().filter(|g| g.numa_node == Some(1)).count(), 4);
}

#[test]
fn table_of_node_level_choices() {
    let mut cordoned = hgx("a-cordoned");
    cordoned.schedulable = false;
    let mut not_ready = hgx("b-notready");
    not_ready.ready = false;
    let mut sick = hgx("c-sick");
    for d in &mut sick.devices {
        d.healthy = false;
        d.reason = Some("reset failed".into());
    }
    let mut no_iommu = hgx("d-noiommu");
    for d in &mut no_iommu.devices {
        d.iommu_group = None;
        d.iommu_group_members.clear();
    }
    let half = hgx("e-half");
    let whole = hgx("f-whole");
    let l40s = l40s_workstation("g-l40s");
    let nodes = vec![cordoned, not_ready, sick, no_iommu, half, whole, l40s];
    let half_taken = taken(
        "e-half",
        &[
            "0000:18:00.0",
            "0000:2a:00.0",
            "0000:3a:00.0",
            "0000:5d:00.0",
        ],
    );

    struct Case {
        name: &'static str,
        request: PlacementRequest,
        want_node: Result<&'static str, &'static str>,
    }
    let spread = |model: &str, count| PlacementRequest {
        strategy: PlacementStrategy::Spread,
        ..request(model, count)
    };
    let selected = |model: &str, count, host: &str| PlacementRequest {
        node_selector: BTreeMap::from([("kubernetes.io/hostname".into(), host.into())]),
        ..request(model, count)
    };
    let cases = [
        Case {
            name: "bin-pack fills the half-used node",
            request: request("h100-80gb", 2),
            want_node: Ok("e-half"),
        },
        Case {
            name: "spread prefers the emptiest node",
            request: spread("h100-80gb", 2),
            want_node: Ok("f-whole"),
        },
        Case {
            name: "8 GPUs need a whole node",
            request: request("h100-80gb", 8),
            want_node: Ok("f-whole"),
        },
        Case {
            name: "any model bin-packs onto the smallest fit",
            request: request(MODEL_ANY, 1),
            want_node: Ok("g-l40s"),
        },
        Case {
            name: "node selector narrows the choice",
            request: selected("h100-80gb", 1, "f-whole"),
            want_node: Ok("f-whole"),
        },
        Case {
            name: "unknown model",
            request: request("b200", 1),
            want_node: Err(
                "no node has 1 free healthy b200 GPU (7 nodes checked: 5 wrong model, 1 not ready, 1 cordoned)",
            ),
        },
        Case {
            name: "too many GPUs for any node",
            request: request("h100-80gb", 9),
            want_node: Err(
                "no node has 9 free healthy h100-80gb GPUs (7 nodes checked: 2 full, 1 not ready, 1 cordoned, 1 wrong model, 1 IOMMU off, 1 unhealthy GPUs)",
            ),
        },
        Case {
            name: "selector matching nothing",
            request: selected("h100-80gb", 1, "nowhere"),
            want_node: Err(
                "no node has 1 free healthy h100-80gb GPU (7 nodes checked: 5 not matching nodeSelector, 1 not ready, 1 cordoned)",
            ),
        },
    ];
    for case in cases {
        let got = place_machine(&case.request, &nodes, &half_taken);
        match (got, case.want_node) {
            (Ok(p), Ok(want)) => assert_eq!(p.node, want, "{}", case.name),
            (Err(e), Err(want)) => assert_eq!(e.to_string(), want, "{}", case.name),
            (got, want) => panic!("{}: got {got:?}, want {want:?}", case.name),
        }
    }
}

#[test]
fn fragmentation_bin_pack_keeps_whole_nodes_for_eight_gpu_machines() {
    let nodes = vec![hgx("n1"), hgx("n2")];
    let mut inv = Inventory::build(&nodes, &no_allocations());
    // Eight 1-GPU machines with bin-pack all land on n1 ...
    for _ in 0..8 {
        let p = inv.place(&request("h100-80gb", 1)).unwrap();
        assert_eq!(p.node, "n1");
        inv.commit(&p);
    }
    // ... so an 8-GPU machine still fits on n2.
    assert_eq!(inv.place(&request("h100-80gb", 8)).unwrap().node, "n2");

    // With spread, the same eight machines split 4/4 and the 8-GPU machine can't fit.
    let mut inv = Inventory::build(&nodes, &no_allocations());
    let spread = PlacementRequest {
        strategy: PlacementStrategy::Spread,
        ..request("h100-80gb", 1)
    };
    for _ in 0..8 {
        let p = inv.place(&spread).unwrap();
        inv.commit(&p);
    }
    let err = inv.place(&request("h100-80gb", 8)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no node has 8 free healthy h100-80gb GPUs (2 nodes checked: 2 full)"
    );
}

#[test]
fn committed_devices_are_never_handed_out_twice() {
    let nodes = vec![hgx("n1"), l40s_workstation("ws")];
    let mut inv = Inventory::build(&nodes, &no_allocations());
    let mut seen = HashSet::new();
    while let Ok(p) = inv.place(&request(MODEL_ANY, 1)) {
        for d in p.devices() {
            assert!(seen.insert((p.node.clone(), d.clone())), "{d} given twice");
        }
        inv.commit(&p);
    }
    assert_eq!(
        seen.len(),
        8 + 2,
        "8 H100s, and the L40S with its audio function"
    );
    let usage = inv.usage_by_model();
    assert_eq!(usage["h100-80gb"], (0, 8));
    assert_eq!(usage["l40s"], (0, 1));
}

#[test]
fn release_returns_devices() {
    let nodes = vec![l40s_workstation("ws")];
    let mut inv = Inventory::build(&nodes, &no_allocations());
    let p = inv.place(&request("l40s", 1)).unwrap();
    inv.commit(&p);
    assert!(inv.place(&request("l40s", 1)).is_err());
    inv.release(&p);
    assert_eq!(inv.place(&request("l40s", 1)).unwrap(), p);
}

#[test]
fn a_taken_companion_blocks_its_group() {
    let nodes = vec![l40s_workstation("ws")];
    let err =
        place_machine(&request("l40s", 1), &nodes, &taken("ws", &["0000:01:00.1"])).unwrap_err();
    assert!(err.to_string().contains("1 full"), "{err}");
}

#[test]
fn two_gpus_in_one_group_are_allocated_together() {
    // Two GPUs behind a switch without ACS land in one IOMMU group.
    let mut a = gpu("0000:41:00.0", "l40", 7, 0, "0000:40:00.0");
    let mut b = gpu("0000:42:00.0", "l40", 7, 0, "0000:40:00.0");
    let members = vec![
        member("0000:41:00.0", MemberRole::Gpu),
        member("0000:42:00.0", MemberRole::Gpu),
    ];
    a.iommu_group_members = members.clone();
    b.iommu_group_members = members;
    let c = gpu("0000:81:00.0", "l40", 8, 1, "0000:80:00.0");
    let n = node("pair", vec![a, b, c]);
    // One GPU: the singleton group, the pair can't be split.
    let p = place_machine(
        &request("l40", 1),
        std::slice::from_ref(&n),
        &no_allocations(),
    )
    .unwrap();
    assert_eq!(addrs(&p), vec!["0000:81:00.0"]);
    // Two GPUs: the pair, together.
    let p = place_machine(
        &request("l40", 2),
        std::slice::from_ref(&n),
        &no_allocations(),
    )
    .unwrap();
    assert_eq!(addrs(&p), vec!["0000:41:00.0", "0000:42:00.0"]);
    // With the singleton taken, one GPU cannot be served by half a group.
    let err =
        place_machine(&request("l40", 1), &[n], &taken("pair", &["0000:81:00.0"])).unwrap_err();
    assert!(err.to_string().contains("1 full"), "{err}");
}

#[test]
fn ties_break_by_node_name_whatever_the_input_order() {
    let mut nodes = vec![hgx("zeta"), hgx("alpha"), hgx("mid")];
    let first = place_machine(&request("h100-80gb", 1), &nodes, &no_allocations()).unwrap();
    nodes.reverse();
    let second = place_machine(&request("h100-80gb", 1), &nodes, &no_allocations()).unwrap();
    assert_eq!(first, second);
    assert_eq!(first.node, "alpha");
}

#[test]
fn no_nodes_at_all() {
    let err = place_machine(&request("h100-80gb", 1), &[], &no_allocations()).unwrap_err();
    assert_eq!(err.reason(), "NoGpuNodes");
    assert!(
        err.to_string().contains("no GPU node is registered"),
        "{err}"
    );
}

#[test]
fn a_device_claimed_twice_is_never_handed_out() {
    // Two inventory entries for one address (or a companion listed in two groups) can't
    // be told apart: using either could give one function to two VMs.
    let dup_a = gpu("0000:01:00.0", "l40s", 1, 0, "0000:00:01.0");
    let dup_b = gpu("0000:01:00.0", "l40s", 2, 0, "0000:00:01.0");
    let mut shares_companion = gpu("0000:02:00.0", "l40s", 3, 0, "0000:00:02.0");
    shares_companion
        .iommu_group_members
        .push(member("0000:09:00.1", MemberRole::Companion));
    let mut also_companion = gpu("0000:03:00.0", "l40s", 4, 0, "0000:00:03.0");
    also_companion
        .iommu_group_members
        .push(member("0000:09:00.1", MemberRole::Companion));
    let clean = gpu("0000:04:00.0", "l40s", 5, 0, "0000:00:04.0");
    let n = node(
        "odd",
        vec![dup_a, dup_b, shares_companion, also_companion, clean],
    );
    let p = place_machine(
        &request("l40s", 1),
        std::slice::from_ref(&n),
        &no_allocations(),
    )
    .unwrap();
    assert_eq!(addrs(&p), vec!["0000:04:00.0"]);
    let err = place_machine(&request("l40s", 2), &[n], &no_allocations()).unwrap_err();
    assert!(err.to_string().contains("unhealthy"), "{err}");
}

#[test]
fn an_nvswitch_node_takes_no_machine_and_the_refusal_names_it() {
    let nodes = vec![with_nvswitches(hgx("hgx-0"))];
    for count in [1, 8] {
        let err =
            place_machine(&request("h100-80gb", count), &nodes, &no_allocations()).unwrap_err();
        assert_eq!(err.reason(), "FabricManagerUnavailable");
        let plural = if count == 1 { "" } else { "s" };
        assert_eq!(
            err.to_string(),
            format!(
                "no node has {count} free healthy h100-80gb GPU{plural} (1 node checked: \
                 1 NVSwitch fabric without Fabric Manager); hgx-0 has 4 NVSwitches \
                 (h100-nvswitch){FABRIC_WHY}"
            )
        );
    }
    // Its GPUs are neither free nor allocated in the metrics.
    let inv = Inventory::build(&nodes, &no_allocations());
    assert_eq!(inv.usage_by_model().get("h100-80gb"), None);
}

#[test]
fn another_node_that_fits_is_used_instead_of_an_nvswitch_node() {
    // The NVSwitch node sorts first and is emptiest: only the fabric keeps it out.
    let nodes = vec![
        with_nvswitches(hgx("a-fabric")),
        hgx("b-pcie"),
        l40s_workstation("ws"),
    ];
    let allocs = taken("b-pcie", &["0000:18:00.0"]);
    let spread = PlacementRequest {
        strategy: PlacementStrategy::Spread,
        ..request("h100-80gb", 2)
    };
    for req in [request("h100-80gb", 7), spread, request(MODEL_ANY, 1)] {
        let p = place_machine(&req, &nodes, &allocs).unwrap();
        assert_ne!(p.node, "a-fabric", "{req:?}");
    }
    // Eight do not fit the other node: the refusal counts both and names the fabric.
    let err = place_machine(&request("h100-80gb", 8), &nodes, &allocs).unwrap_err();
    assert_eq!(err.reason(), "FabricManagerUnavailable");
    assert_eq!(
        err.to_string(),
        format!(
            "no node has 8 free healthy h100-80gb GPUs (3 nodes checked: 1 wrong model, 1 full, \
             1 NVSwitch fabric without Fabric Manager); a-fabric has 4 NVSwitches \
             (h100-nvswitch){FABRIC_WHY}"
        )
    );
}

#[test]
fn nvswitch_nodes_that_could_not_serve_anyway_do_not_change_the_reason() {
    let mut cordoned = with_nvswitches(hgx("a-cordoned"));
    cordoned.schedulable = false;
    let nodes = vec![cordoned, with_nvswitches(hgx("b-fabric"))];
    // Wrong model, cordoned: those reasons come before the fabric.
    let err = place_machine(&request("l40s", 1), &nodes, &no_allocations()).unwrap_err();
    assert_eq!(err.reason(), "Unschedulable");
    assert_eq!(
        err.to_string(),
        "no node has 1 free healthy l40s GPU (2 nodes checked: 1 cordoned, 1 wrong model)"
    );
}

#[test]
fn many_nvswitch_nodes_are_named_up_to_three() {
    let mut nodes: Vec<NodeView> = (0..5)
        .map(|i| with_nvswitches(hgx(&format!("hgx-{i}"))))
        .collect();
    // An inventory from an older node agent: bare addresses, no model.
    for switch in &mut nodes[0].nvswitches {
        switch.device_id.clear();
        switch.model.clear();
    }
    nodes[1].nvswitches.truncate(1);
    let err = place_machine(&request(MODEL_ANY, 1), &nodes, &no_allocations()).unwrap_err();
    assert_eq!(err.reason(), "FabricManagerUnavailable");
    assert_eq!(
        err.to_string(),
        format!(
            "no node has 1 free healthy GPU (5 nodes checked: 5 NVSwitch fabric without \
             Fabric Manager); hgx-0 has 4 NVSwitches, hgx-1 has 1 NVSwitch (h100-nvswitch), \
             hgx-2 has 4 NVSwitches (h100-nvswitch) and 2 more{FABRIC_WHY}"
        )
    );
}

#[test]
fn a_machine_already_on_an_nvswitch_node_keeps_its_record_but_nothing_new_lands() {
    // A machine placed before this rule holds GPUs there: they stay taken (not handed
    // out again), and the rest stays blocked.
    let nodes = vec![with_nvswitches(hgx("hgx-0"))];
    let allocs = taken("hgx-0", &["0000:18:00.0"]);
    let mut inv = Inventory::build(&nodes, &allocs);
    assert!(inv.place(&request("h100-80gb", 1)).is_err());
    let old = Placement {
        node: "hgx-0".into(),
        gpus: vec![AllocatedGpu {
            pci_address: "0000:18:00.0".into(),
            model: "h100-80gb".into(),
            iommu_group: Some(10),
            numa_node: Some(0),
            companions: Vec::new(),
        }],
    };
    inv.release(&old);
    assert!(inv.place(&request("h100-80gb", 1)).is_err());
}
