//! Table tests of the pure core (`inventory_to_status`, `labels_for`, the planned
//! actions and the table) over every fake-sysfs preset of `gpuvm-pci`, with the inputs
//! gathered by `observe` from the fake tree, as the agent gathers them from `/sys`.

use std::collections::BTreeMap;
use std::fs;

use gpuvm_api::keys::{LABEL_GPU_COUNT, LABEL_GPU_MODEL, LABEL_GPU_NODE};
use gpuvm_api::{GpuDevice, GpuNodeStatus, IommuMember, MemberRole};
use gpuvm_node::labels::OWNED_LABELS;
use gpuvm_node::status::member_role;
use gpuvm_node::{
    AgentConfig, Observations, PlannedAction, REASON_DISAPPEARED, inventory_to_status, label_patch,
    labels_for, observe, planned_actions, planned_bindings, render_table,
};
use gpuvm_pci::class::DeviceRole;
use gpuvm_pci::testing::presets::{self, HGX_H100_GPUS, HGX_H100_NVSWITCHES};
use gpuvm_pci::testing::{FakeSysfs, SysfsBuilder, bdf};
use gpuvm_pci::{Sysfs, scan};
use serde_json::json;

/// A fake host and where its reset-failure records go.
struct Host {
    fake: FakeSysfs,
    health: tempfile::TempDir,
    bind: bool,
}

impl Host {
    fn new(builder: SysfsBuilder, bind: bool) -> Self {
        Host {
            fake: builder.build().expect("building the fake sysfs"),
            health: tempfile::tempdir().expect("a temp dir for health records"),
            bind,
        }
    }

    fn config(&self) -> AgentConfig {
        AgentConfig {
            sysfs_root: self.fake.sys_root(),
            dev_root: self.fake.dev_root(),
            health_dir: self.health.path().to_owned(),
            bind: self.bind,
        }
    }

    /// One pass that writes (binds) when binding is on, then the status.
    fn pass(&self, previous: Vec<GpuDevice>) -> GpuNodeStatus {
        let pass = observe(&self.config(), previous, true);
        inventory_to_status(&pass.inventory, &pass.observations)
    }

    /// One pass that writes nothing.
    fn look(&self) -> GpuNodeStatus {
        let pass = observe(&self.config(), Vec::new(), false);
        inventory_to_status(&pass.inventory, &pass.observations)
    }

    fn device<'a>(&self, status: &'a GpuNodeStatus, address: &str) -> &'a GpuDevice {
        status
            .devices
            .iter()
            .find(|d| d.pci_address == address)
            .unwrap_or_else(|| panic!("{address} not in {:#?}", status.devices))
    }
}

fn member(address: &str, role: MemberRole) -> IommuMember {
    IommuMember {
        pci_address: address.to_owned(),
        role,
    }
}

fn reason(device: &GpuDevice) -> &str {
    device.reason.as_deref().unwrap_or("")
}

#[test]
fn pci_roles_map_to_api_roles() {
    let cases = [
        (DeviceRole::NvidiaGpu, MemberRole::Gpu),
        (DeviceRole::GpuCompanion, MemberRole::Companion),
        (DeviceRole::Bridge, MemberRole::Bridge),
        (DeviceRole::NvSwitch, MemberRole::Host),
        (DeviceRole::HostDevice, MemberRole::Host),
    ];
    for (pci, api) in cases {
        assert_eq!(member_role(pci), api, "{pci:?}");
    }
}

#[test]
fn hgx_h100_has_eight_healthy_gpus_four_nvswitches_two_numa_nodes() {
    let host = Host::new(presets::hgx_h100_8gpu(), true);
    let status = host.pass(Vec::new());
    assert!(status.iommu_enabled);
    assert_eq!((status.gpu_count, status.healthy_count), (8, 8));
    assert_eq!(status.nvswitches, HGX_H100_NVSWITCHES.map(str::to_owned));
    let switches: Vec<(&str, &str, &str)> = status
        .nvswitch_devices
        .iter()
        .map(|s| {
            (
                s.pci_address.as_str(),
                s.device_id.as_str(),
                s.model.as_str(),
            )
        })
        .collect();
    assert_eq!(
        switches,
        HGX_H100_NVSWITCHES.map(|a| (a, "22a3", "h100-nvswitch"))
    );
    let table = render_table(&status, &[]);
    assert!(
        table.contains("NVSwitches: 4\n")
            && table.contains("NVSwitches: 0000:06:00.0 (h100-nvswitch), 0000:07:00.0"),
        "{table}"
    );
    assert_eq!(status.message, None);
    assert_eq!(status.heartbeat, None, "the publisher stamps the heartbeat");
    let addresses: Vec<&str> = status
        .devices
        .iter()
        .map(|d| d.pci_address.as_str())
        .collect();
    assert_eq!(addresses, HGX_H100_GPUS.map(|(a, _, _)| a));
    for (address, numa, switch) in HGX_H100_GPUS {
        let d = host.device(&status, address);
        assert!(d.healthy, "{address}: {:?}", d.reason);
        assert_eq!(d.reason, None);
        assert_eq!(d.model, "h100-80gb");
        assert_eq!(
            (d.vendor_id.as_str(), d.device_id.as_str()),
            ("10de", "2330")
        );
        assert_eq!(d.numa_node, Some(i32::try_from(numa).expect("small")));
        assert_eq!(d.pcie_parent.as_deref(), Some(switch));
        assert_eq!(d.driver.as_deref(), Some("vfio-pci"));
        assert!(d.iommu_group.is_some());
        assert_eq!(
            d.iommu_group_members,
            vec![member(address, MemberRole::Gpu)]
        );
    }
    let numa: std::collections::BTreeSet<_> = status.devices.iter().map(|d| d.numa_node).collect();
    assert_eq!(numa.len(), 2);
    // Everything was bound already: not one write.
    assert_eq!(host.fake.all_writes().expect("reading writes"), vec![]);
}

#[test]
fn l40s_audio_is_a_companion_and_binding_makes_the_gpu_healthy() {
    let host = Host::new(presets::workstation_l40s(), true);

    let before = host.look();
    let gpu = host.device(&before, "0000:01:00.0");
    assert_eq!(before.gpu_count, 1);
    assert_eq!(gpu.model, "l40s");
    assert_eq!(gpu.iommu_group, Some(12));
    assert_eq!(gpu.numa_node, None);
    assert_eq!(
        gpu.pcie_parent.as_deref(),
        Some("0000:00:01.1"),
        "root port"
    );
    assert_eq!(
        gpu.iommu_group_members,
        vec![
            member("0000:01:00.0", MemberRole::Gpu),
            member("0000:01:00.1", MemberRole::Companion),
        ]
    );
    assert!(!gpu.healthy);
    assert_eq!(reason(gpu), "0000:01:00.0 is bound to nvidia, not vfio-pci");
    assert_eq!(
        host.fake.all_writes().expect("writes"),
        vec![],
        "a look writes nothing"
    );

    // The binding pass writes; the kernel rebinds (settle); the next pass sees vfio-pci.
    let _ = host.pass(Vec::new());
    let writes = host.fake.all_writes().expect("writes");
    assert!(
        writes.contains(&(
            "bus/pci/drivers/nvidia/unbind".to_owned(),
            "0000:01:00.0".to_owned()
        )),
        "{writes:?}"
    );
    assert!(
        writes.contains(&(
            "bus/pci/drivers/snd_hda_intel/unbind".to_owned(),
            "0000:01:00.1".to_owned()
        )),
        "{writes:?}"
    );
    host.fake.settle().expect("settling");
    let after = host.pass(Vec::new());
    let gpu = host.device(&after, "0000:01:00.0");
    assert!(gpu.healthy, "{:?}", gpu.reason);
    assert_eq!(gpu.driver.as_deref(), Some("vfio-pci"));
    assert_eq!((after.gpu_count, after.healthy_count), (1, 1));
}

#[test]
fn gpu_sharing_its_group_with_a_nic_is_unhealthy_and_never_bound() {
    let host = Host::new(presets::gpu_shares_group_with_nic(), true);
    let _ = host.pass(Vec::new());
    host.fake.settle().expect("settling");
    let status = host.pass(Vec::new());
    let shared = host.device(&status, "0000:43:00.0");
    assert!(!shared.healthy);
    assert!(
        reason(shared).contains("0000:44:00.0"),
        "{}",
        reason(shared)
    );
    assert!(
        reason(shared).contains("Ethernet controller"),
        "{}",
        reason(shared)
    );
    assert!(
        shared
            .iommu_group_members
            .contains(&member("0000:44:00.0", MemberRole::Host))
    );
    assert!(
        shared
            .iommu_group_members
            .contains(&member("0000:42:08.0", MemberRole::Bridge))
    );
    assert_eq!(shared.driver.as_deref(), Some("nvidia"), "never unbound");
    let alone = host.device(&status, "0000:c1:00.0");
    assert!(alone.healthy, "{:?}", alone.reason);
    assert_eq!((status.gpu_count, status.healthy_count), (2, 1));
    let writes = host.fake.all_writes().expect("writes");
    assert!(
        writes
            .iter()
            .all(|(_, value)| !value.contains("43:00.0") && !value.contains("44:00.0")),
        "{writes:?}"
    );
}

#[test]
fn iommu_off_makes_every_gpu_unhealthy() {
    let host = Host::new(presets::iommu_off(), true);
    let status = host.pass(Vec::new());
    assert!(!status.iommu_enabled);
    assert_eq!((status.gpu_count, status.healthy_count), (2, 0));
    for d in &status.devices {
        assert!(!d.healthy);
        assert!(reason(d).contains("the IOMMU is off"), "{}", reason(d));
        assert_eq!(d.iommu_group, None);
        assert!(d.iommu_group_members.is_empty());
        assert_eq!(d.model, "l4");
    }
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("IOMMU is off")),
        "{:?}",
        status.message
    );
    assert_eq!(host.fake.all_writes().expect("writes"), vec![]);
}

#[test]
fn with_no_bind_a_gpu_on_nvidia_is_unhealthy_and_nothing_is_written() {
    let host = Host::new(presets::a100_bound_to_nvidia(), false);
    let status = host.pass(Vec::new());
    let on_nvidia = host.device(&status, "0000:31:00.0");
    assert!(!on_nvidia.healthy);
    assert!(
        reason(on_nvidia).contains("bound to nvidia, not vfio-pci"),
        "{}",
        reason(on_nvidia)
    );
    assert!(reason(on_nvidia).contains("--no-bind"));
    assert_eq!(on_nvidia.model, "a100-80gb");
    let on_vfio = host.device(&status, "0000:b1:00.0");
    assert!(on_vfio.healthy, "{:?}", on_vfio.reason);
    assert_eq!(on_vfio.numa_node, Some(1));
    assert_eq!((status.gpu_count, status.healthy_count), (2, 1));
    assert_eq!(host.fake.all_writes().expect("writes"), vec![]);
}

#[test]
fn binding_without_vfio_pci_loaded_reports_the_bind_error() {
    let host = Host::new(presets::workstation_l40s().without_vfio_pci(), true);
    let status = host.pass(Vec::new());
    let gpu = host.device(&status, "0000:01:00.0");
    assert!(!gpu.healthy);
    assert!(
        reason(gpu).starts_with(
            "could not bind IOMMU group 12 to vfio-pci: the vfio-pci driver is not loaded"
        ),
        "{}",
        reason(gpu)
    );
}

#[test]
fn a_gpu_vanishing_between_scans_stays_listed_as_unhealthy() {
    let host = Host::new(presets::hgx_h100_8gpu(), true);
    let first = host.pass(Vec::new());
    assert_eq!(first.healthy_count, 8);

    fs::remove_file(host.fake.sysfs().devices_dir().join("0000:9d:00.0")).expect("unplugging");
    let second = host.pass(first.devices.clone());
    assert_eq!((second.gpu_count, second.healthy_count), (8, 7));
    let gone = host.device(&second, "0000:9d:00.0");
    assert!(!gone.healthy);
    assert_eq!(gone.reason.as_deref(), Some(REASON_DISAPPEARED));
    assert_eq!(gone.driver, None);
    // What is known about it is kept.
    assert_eq!(gone.model, "h100-80gb");
    assert_eq!(gone.numa_node, Some(1));
    let addresses: Vec<&str> = second
        .devices
        .iter()
        .map(|d| d.pci_address.as_str())
        .collect();
    assert_eq!(
        addresses,
        HGX_H100_GPUS.map(|(a, _, _)| a),
        "still in address order"
    );

    // And it stays listed on the pass after.
    let third = host.pass(second.devices.clone());
    assert_eq!(third, second);
    assert_eq!(labels_for(&third)[LABEL_GPU_COUNT], "7");
}

#[test]
fn a_reset_failure_record_makes_its_gpu_unhealthy() {
    let host = Host::new(presets::hgx_h100_8gpu(), true);
    fs::write(
        host.health.path().join("0000:3d:00.0"),
        "reset failed: flr: Inappropriate ioctl for device\n",
    )
    .expect("writing a record");
    let status = host.pass(Vec::new());
    let failed = host.device(&status, "0000:3d:00.0");
    assert!(!failed.healthy);
    assert_eq!(
        reason(failed),
        "the last reset of 0000:3d:00.0 failed: reset failed: flr: Inappropriate ioctl for device"
    );
    assert_eq!(status.healthy_count, 7);

    // Removing the record puts it back.
    fs::remove_file(host.health.path().join("0000:3d:00.0")).expect("removing the record");
    assert_eq!(host.pass(Vec::new()).healthy_count, 8);
}

#[test]
fn a_reset_failure_of_a_companion_makes_its_gpu_unhealthy() {
    let host = Host::new(presets::workstation_l40s(), true);
    let _ = host.pass(Vec::new());
    host.fake.settle().expect("settling");
    fs::write(host.health.path().join("0000:01:00.1"), "").expect("writing a record");
    let status = host.pass(Vec::new());
    let gpu = host.device(&status, "0000:01:00.0");
    assert!(!gpu.healthy);
    assert_eq!(
        reason(gpu),
        "the last reset of 0000:01:00.1 failed: no reason recorded"
    );
}

#[test]
fn a_missing_vfio_group_device_makes_the_gpu_unhealthy() {
    let host = Host::new(presets::hgx_h100_8gpu(), true);
    let group = host
        .device(&host.look(), "0000:18:00.0")
        .iommu_group
        .expect("a group");
    fs::remove_file(host.fake.dev_root().join(format!("vfio/{group}"))).expect("removing");
    let status = host.pass(Vec::new());
    let gpu = host.device(&status, "0000:18:00.0");
    assert!(!gpu.healthy);
    assert!(
        reason(gpu).contains(&format!("vfio/{group} for 0000:18:00.0 does not exist")),
        "{}",
        reason(gpu)
    );
    assert_eq!(status.healthy_count, 7);
}

#[test]
fn no_gpu_gives_an_empty_status_with_a_message() {
    let host = Host::new(SysfsBuilder::new(), true);
    let status = host.pass(Vec::new());
    assert_eq!((status.gpu_count, status.healthy_count), (0, 0));
    assert!(status.devices.is_empty());
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("no NVIDIA GPU found")),
        "{:?}",
        status.message
    );
    assert!(labels_for(&status).is_empty());
}

#[test]
fn labels_name_the_dominant_model_and_the_healthy_count() {
    let host = Host::new(presets::hgx_h100_8gpu(), true);
    let status = host.pass(Vec::new());
    assert_eq!(
        labels_for(&status),
        BTreeMap::from([
            (LABEL_GPU_NODE.to_owned(), "true".to_owned()),
            (LABEL_GPU_MODEL.to_owned(), "h100-80gb".to_owned()),
            (LABEL_GPU_COUNT.to_owned(), "8".to_owned()),
        ])
    );

    let device = |model: &str, healthy: bool| GpuDevice {
        model: model.to_owned(),
        healthy,
        ..GpuDevice::default()
    };
    let cases: [(Vec<GpuDevice>, &str, &str); 4] = [
        (vec![device("l4", true)], "l4", "1"),
        (
            vec![
                device("l4", true),
                device("l40s", false),
                device("l40s", false),
            ],
            "l40s",
            "1",
        ),
        // A tie goes to the first name in order.
        (
            vec![device("l40s", true), device("a100-80gb", true)],
            "a100-80gb",
            "2",
        ),
        (vec![device("h100-80gb", false)], "h100-80gb", "0"),
    ];
    for (devices, model, count) in cases {
        let status = GpuNodeStatus {
            devices,
            ..GpuNodeStatus::default()
        };
        let labels = labels_for(&status);
        assert_eq!(labels[LABEL_GPU_NODE], "true");
        assert_eq!(labels[LABEL_GPU_MODEL], model);
        assert_eq!(labels[LABEL_GPU_COUNT], count);
    }
}

#[test]
fn the_label_patch_names_only_owned_keys_and_removes_absent_ones() {
    let labels = BTreeMap::from([
        (LABEL_GPU_NODE.to_owned(), "true".to_owned()),
        (LABEL_GPU_MODEL.to_owned(), "l4".to_owned()),
        (LABEL_GPU_COUNT.to_owned(), "2".to_owned()),
        ("unrelated".to_owned(), "x".to_owned()),
    ]);
    assert_eq!(
        label_patch(&labels),
        json!({"metadata": {"labels": {
            "gpuvm.dev/gpu-node": "true",
            "gpuvm.dev/gpu.model": "l4",
            "gpuvm.dev/gpu.count": "2",
        }}})
    );
    assert_eq!(
        label_patch(&BTreeMap::new()),
        json!({"metadata": {"labels": {
            "gpuvm.dev/gpu-node": null,
            "gpuvm.dev/gpu.model": null,
            "gpuvm.dev/gpu.count": null,
        }}})
    );
    assert_eq!(OWNED_LABELS.len(), 3);
}

#[test]
fn planned_bindings_cover_capable_unbound_groups_only() {
    let inventory = |builder: SysfsBuilder| {
        let fake = builder.build().expect("building");
        scan(&Sysfs::new(fake.sys_root()))
    };
    let cases: Vec<(&str, SysfsBuilder, bool, Vec<PlannedAction>)> = vec![
        ("hgx, all bound", presets::hgx_h100_8gpu(), true, vec![]),
        (
            "l40s with its audio",
            presets::workstation_l40s(),
            true,
            vec![PlannedAction::BindGroup {
                group: 12,
                devices: vec![
                    (bdf("0000:01:00.0"), Some("nvidia".to_owned())),
                    (bdf("0000:01:00.1"), Some("snd_hda_intel".to_owned())),
                ],
            }],
        ),
        (
            "the group with a NIC is left alone",
            presets::gpu_shares_group_with_nic(),
            true,
            vec![PlannedAction::BindGroup {
                group: 40,
                devices: vec![(bdf("0000:c1:00.0"), Some("nvidia".to_owned()))],
            }],
        ),
        ("iommu off", presets::iommu_off(), true, vec![]),
        (
            "no-bind",
            presets::a100_bound_to_nvidia(),
            false,
            vec![PlannedAction::LeaveUnbound {
                gpu: bdf("0000:31:00.0"),
                driver: Some("nvidia".to_owned()),
            }],
        ),
    ];
    for (name, builder, binding, want) in cases {
        assert_eq!(
            planned_bindings(&inventory(builder), binding),
            want,
            "{name}"
        );
    }
}

#[test]
fn the_dry_run_table_lists_devices_actions_and_labels() {
    let host = Host::new(presets::workstation_l40s(), true);
    let pass = observe(&host.config(), Vec::new(), false);
    let status = inventory_to_status(&pass.inventory, &pass.observations);
    let actions = planned_actions(&pass.inventory, true, Some("ws-1"), &status);
    let table = render_table(&status, &actions);
    for want in [
        "IOMMU: on   GPUs: 1   healthy: 0   NVSwitches: 0",
        "ADDRESS",
        "0000:01:00.0  l40s",
        "01:00.0:Gpu,01:00.1:Companion",
        "0000:01:00.0 is bound to nvidia, not vfio-pci",
        "bind IOMMU group 12 to vfio-pci: 0000:01:00.0 (unbind from nvidia), 0000:01:00.1 (unbind from snd_hda_intel)",
        "publish GpuNode ws-1",
        "label Node ws-1: gpuvm.dev/gpu-node=true, gpuvm.dev/gpu.count=0, gpuvm.dev/gpu.model=l40s",
    ] {
        assert!(table.contains(want), "missing {want:?} in:\n{table}");
    }

    let empty = render_table(
        &inventory_to_status(&scan(&Sysfs::new("/nonexistent")), &Observations::default()),
        &[],
    );
    assert!(empty.contains("no NVIDIA GPU found"), "{empty}");
    assert!(empty.contains("actions: none"), "{empty}");
}

/// The operator's own reading of what the agent publishes (the same check the e2e test
/// makes against a real API server): an NVSwitch board takes nothing, and unhealthy
/// GPUs are never placed.
#[test]
fn the_operator_never_places_what_the_agent_marks_unhealthy() {
    use gpuvm_api::{GpuNode, GpuNodeSpec, PlacementStrategy};
    use gpuvm_operator::inventory::node_views;
    use gpuvm_operator::scheduler::{PlacementRequest, place_machine};
    use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    let host = Host::new(presets::hgx_h100_8gpu(), true);
    let first = host.pass(Vec::new());
    fs::remove_file(host.fake.sysfs().devices_dir().join("0000:9d:00.0")).expect("unplugging");
    fs::write(host.health.path().join("0000:18:00.0"), "flr failed").expect("a record");
    let status = host.pass(first.devices);

    let mut gpu_node = GpuNode::new(
        "hgx-1",
        GpuNodeSpec {
            node_name: "hgx-1".to_owned(),
            unschedulable: false,
        },
    );
    gpu_node.status = Some(GpuNodeStatus {
        heartbeat: Some(Time(Timestamp::now())),
        ..status.clone()
    });
    let mut node = Node::default();
    node.metadata.name = Some("hgx-1".to_owned());
    node.metadata.labels = Some(labels_for(&status));
    node.status = Some(NodeStatus {
        conditions: Some(vec![NodeCondition {
            type_: "Ready".to_owned(),
            status: "True".to_owned(),
            ..NodeCondition::default()
        }]),
        ..NodeStatus::default()
    });
    let mut views = node_views(
        [&gpu_node],
        [&node],
        Timestamp::now(),
        std::time::Duration::from_secs(120),
    );
    assert!(views[0].ready && views[0].schedulable, "{views:?}");
    let request = |count| PlacementRequest {
        model: "h100-80gb".to_owned(),
        count,
        node_selector: BTreeMap::from([(LABEL_GPU_NODE.to_owned(), "true".to_owned())]),
        strategy: PlacementStrategy::default(),
    };
    // The board's NVSwitches, as the agent publishes them, keep every machine off it.
    let refused = place_machine(&request(1), &views, &BTreeMap::new()).expect_err("NVSwitches");
    assert_eq!(refused.reason(), "FabricManagerUnavailable");
    assert!(
        refused
            .to_string()
            .contains("hgx-1 has 4 NVSwitches (h100-nvswitch)"),
        "{refused}"
    );
    // Without them (a fabric someone else set up), what is left is the GPUs' health.
    views[0].nvswitches.clear();
    assert!(place_machine(&request(7), &views, &BTreeMap::new()).is_err());
    let placed = place_machine(&request(6), &views, &BTreeMap::new()).expect("6 fit");
    let devices = placed.devices();
    assert_eq!(devices.len(), 6);
    assert!(!devices.contains(&"0000:9d:00.0".to_owned()), "{devices:?}");
    assert!(!devices.contains(&"0000:18:00.0".to_owned()), "{devices:?}");
}
