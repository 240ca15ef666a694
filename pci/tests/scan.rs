//! Scans of fake trees faithful to real machines, and of this machine's `/sys`.

use std::collections::BTreeSet;
use std::fs;

use gpuvm_pci::testing::presets::{self, HGX_H100_GPUS, HGX_H100_NVSWITCHES};
use gpuvm_pci::testing::{DeviceSpec, SysfsBuilder, bdf};
use gpuvm_pci::{
    DeviceRole, Inventory, Passthrough, PciAddress, Sysfs, nvswitch_model, nvswitch_model_name,
    scan,
};

fn scan_of(builder: &SysfsBuilder) -> Inventory {
    let fake = builder.build().expect("build the fake sysfs");
    let inventory = scan(&fake.sysfs());
    assert_eq!(inventory.devices_scanned, builder.devices().len());
    inventory
}

fn not_capable_reason(passthrough: &Passthrough) -> &str {
    match passthrough {
        Passthrough::NotCapable { reason } => reason,
        Passthrough::Capable => panic!("expected the GPU not to be passthrough-capable"),
    }
}

#[test]
fn hgx_h100_board_has_eight_gpus_on_two_numa_nodes_and_four_nvswitches() {
    let inventory = scan_of(&presets::hgx_h100_8gpu());
    assert!(inventory.iommu_enabled);
    assert!(inventory.problems.is_empty(), "{:?}", inventory.problems);

    let found: Vec<(String, Option<u32>, Option<PciAddress>)> = inventory
        .gpus
        .iter()
        .map(|gpu| {
            (
                gpu.address().to_string(),
                gpu.numa_node(),
                gpu.parent_switch,
            )
        })
        .collect();
    let expected: Vec<(String, Option<u32>, Option<PciAddress>)> = HGX_H100_GPUS
        .iter()
        .map(|(address, numa, switch)| (address.to_string(), Some(*numa), Some(bdf(switch))))
        .collect();
    assert_eq!(found, expected);

    let switches: BTreeSet<_> = inventory.gpus.iter().map(|g| g.parent_switch).collect();
    assert_eq!(switches.len(), 4, "two GPUs per switch");

    let mut groups = BTreeSet::new();
    for gpu in &inventory.gpus {
        assert_eq!(gpu.model, "h100-80gb");
        assert_eq!(gpu.passthrough, Passthrough::Capable);
        assert!(gpu.bound_to_vfio() && gpu.group_bound_to_vfio());
        assert!(gpu.companions.is_empty());
        let group = gpu.iommu_group.as_ref().unwrap();
        assert_eq!(group.members.len(), 1, "one IOMMU group per GPU");
        assert_eq!(group.members[0].address, gpu.address());
        assert_eq!(group.members[0].role, DeviceRole::NvidiaGpu);
        assert_eq!(gpu.device.iommu_group, Some(group.number));
        groups.insert(group.number);

        let device = &gpu.device;
        assert_eq!(
            (device.vendor, device.device, device.class),
            (0x10de, 0x2330, 0x030200)
        );
        assert_eq!(
            (device.subsystem_vendor, device.subsystem_device),
            (Some(0x10de), Some(0x16c1))
        );
        assert_eq!(device.reset_methods, ["flr", "bus"]);
        assert!(device.can_reset());
        let sizes: Vec<(u8, u64)> = device.bars.iter().map(|b| (b.index, b.size)).collect();
        assert_eq!(sizes, [(0, 16 << 20), (1, 128 << 30), (3, 32 << 20)]);
        assert!(device.bar(1).unwrap().is_64bit() && device.bar(1).unwrap().is_prefetchable());
        assert!(!device.link.as_ref().unwrap().is_degraded());
    }
    assert_eq!(groups.len(), 8);

    let first = &inventory.gpus[0].device;
    assert_eq!(first.host_bridge.as_deref(), Some("pci0000:15"));
    assert_eq!(
        first.upstream,
        [
            bdf("0000:15:01.0"),
            bdf("0000:16:00.0"),
            bdf("0000:17:00.0")
        ]
    );
    assert_eq!(first.root_port(), Some(bdf("0000:15:01.0")));

    let nvswitches: Vec<String> = inventory
        .nvswitches
        .iter()
        .map(|s| s.address.to_string())
        .collect();
    assert_eq!(nvswitches, HGX_H100_NVSWITCHES);
    for nvswitch in &inventory.nvswitches {
        assert_eq!(
            (nvswitch.vendor, nvswitch.device, nvswitch.class),
            (0x10de, 0x22a3, 0x068000)
        );
        assert_eq!(nvswitch.driver.as_deref(), Some("nvidia-nvswitch"));
        assert_eq!(nvswitch.numa_node, Some(0));
    }
}

#[test]
fn l40s_workstation_gpu_shares_its_group_with_its_hdmi_audio() {
    let inventory = scan_of(&presets::workstation_l40s());
    assert!(inventory.nvswitches.is_empty());
    let [gpu] = inventory.gpus.as_slice() else {
        panic!("expected one GPU, found {:?}", inventory.gpus);
    };
    assert_eq!(gpu.address(), bdf("0000:01:00.0"));
    assert_eq!(gpu.model, "l40s");
    assert_eq!(gpu.device.class, 0x030000, "display enabled: VGA class");
    assert_eq!(gpu.numa_node(), None, "numa_node -1 is no node");
    assert_eq!(gpu.parent_switch, None, "directly below a root port");
    assert_eq!(gpu.device.upstream, [bdf("0000:00:01.1")]);
    assert_eq!(gpu.device.driver.as_deref(), Some("nvidia"));
    assert!(!gpu.bound_to_vfio());
    assert_eq!(gpu.passthrough, Passthrough::Capable);
    assert_eq!(gpu.companions, [bdf("0000:01:00.1")]);

    let group = gpu.iommu_group.as_ref().unwrap();
    assert_eq!(group.number, 12);
    let members: Vec<(String, DeviceRole, Option<&str>)> = group
        .members
        .iter()
        .map(|m| (m.address.to_string(), m.role, m.driver.as_deref()))
        .collect();
    assert_eq!(
        members,
        [
            ("0000:01:00.0".into(), DeviceRole::NvidiaGpu, Some("nvidia")),
            (
                "0000:01:00.1".into(),
                DeviceRole::GpuCompanion,
                Some("snd_hda_intel")
            ),
        ]
    );
}

#[test]
fn gpu_sharing_a_group_with_a_nic_is_not_passthrough_capable() {
    let inventory = scan_of(&presets::gpu_shares_group_with_nic());
    assert_eq!(inventory.gpus.len(), 2);

    let shared = &inventory.gpus[0];
    assert_eq!(shared.address(), bdf("0000:43:00.0"));
    assert_eq!(shared.model, "h100-80gb");
    assert_eq!(shared.parent_switch, Some(bdf("0000:41:00.0")));
    let group = shared.iommu_group.as_ref().unwrap();
    let roles: Vec<(String, DeviceRole)> = group
        .members
        .iter()
        .map(|m| (m.address.to_string(), m.role))
        .collect();
    assert_eq!(
        roles,
        [
            ("0000:42:08.0".into(), DeviceRole::Bridge),
            ("0000:42:10.0".into(), DeviceRole::Bridge),
            ("0000:43:00.0".into(), DeviceRole::NvidiaGpu),
            ("0000:44:00.0".into(), DeviceRole::HostDevice),
        ]
    );
    assert_eq!(
        not_capable_reason(&shared.passthrough),
        "cannot pass 0000:43:00.0 through: its IOMMU group 31 also holds 0000:44:00.0 \
         (Ethernet controller, vendor 0x15b3, class 0x020000), a device the host uses"
    );

    let alone = &inventory.gpus[1];
    assert_eq!(alone.address(), bdf("0000:c1:00.0"));
    assert_eq!(alone.numa_node(), Some(1));
    assert_eq!(alone.passthrough, Passthrough::Capable);
}

#[test]
fn iommu_off_still_lists_gpus_but_not_as_passthrough_capable() {
    let inventory = scan_of(&presets::iommu_off());
    assert!(!inventory.iommu_enabled);
    assert!(inventory.problems.is_empty(), "{:?}", inventory.problems);
    let addresses: Vec<String> = inventory
        .gpus
        .iter()
        .map(|g| g.address().to_string())
        .collect();
    assert_eq!(addresses, ["0000:01:00.0", "0000:02:00.0"]);
    for gpu in &inventory.gpus {
        assert_eq!(gpu.model, "l4");
        assert_eq!(gpu.numa_node(), Some(0));
        assert_eq!(gpu.device.iommu_group, None);
        assert!(gpu.iommu_group.is_none());
        assert!(!gpu.group_bound_to_vfio());
        let reason = not_capable_reason(&gpu.passthrough);
        assert!(reason.contains("the IOMMU is off"), "{reason}");
        assert!(reason.contains("intel_iommu=on"), "{reason}");
    }
}

#[test]
fn gpu_bound_to_nvidia_is_reported_with_its_driver() {
    let inventory = scan_of(&presets::a100_bound_to_nvidia());
    let drivers: Vec<(String, Option<&str>, bool)> = inventory
        .gpus
        .iter()
        .map(|g| {
            (
                g.address().to_string(),
                g.device.driver.as_deref(),
                g.bound_to_vfio(),
            )
        })
        .collect();
    assert_eq!(
        drivers,
        [
            ("0000:31:00.0".into(), Some("nvidia"), false),
            ("0000:b1:00.0".into(), Some("vfio-pci"), true),
        ]
    );
    for gpu in &inventory.gpus {
        assert_eq!(gpu.model, "a100-80gb");
        assert_eq!(gpu.device.reset_methods, ["bus"]);
        assert!(gpu.passthrough.is_capable());
    }
    assert!(
        !inventory.gpus[0]
            .device
            .link
            .as_ref()
            .unwrap()
            .is_degraded()
    );
    assert!(
        inventory.gpus[1]
            .device
            .link
            .as_ref()
            .unwrap()
            .is_degraded(),
        "x8 of x16"
    );
}

#[test]
fn unknown_nvidia_device_gets_a_fallback_model_and_other_vendors_are_ignored() {
    let builder = SysfsBuilder::new()
        .device(DeviceSpec::nvidia_gpu("0000:01:00.0", 0x1eb8, 0xa000_0000).group(1))
        .device(DeviceSpec::new("0000:02:00.0", 0x1002, 0x740f, 0x038000).group(2))
        .device(DeviceSpec::new("0000:03:00.0", 0x8086, 0x56c0, 0x030000).group(3));
    let inventory = scan_of(&builder);
    let [gpu] = inventory.gpus.as_slice() else {
        panic!("expected only the NVIDIA GPU, found {:?}", inventory.gpus);
    };
    assert_eq!(gpu.model, "nvidia-1eb8");
    assert_eq!(gpu.device.driver, None);
}

#[test]
fn hgx_a100_nvswitches_are_found_by_vendor_and_class_and_named_by_id() {
    // Two A100 SXM4 GPUs and the six second-generation NVSwitches of an HGX A100 board
    // (10de:1af1, class 0x068000, bound to no driver: the host has no nvidia-nvswitch),
    // one NVIDIA 0x0680 function with an id this crate does not know, and "other
    // bridge" functions of other vendors, which are no NVSwitch.
    let mut builder = SysfsBuilder::new()
        .device(DeviceSpec::nvidia_gpu("0000:07:00.0", 0x20b2, 0xa000_0000).group(1))
        .device(DeviceSpec::nvidia_gpu("0000:0f:00.0", 0x20b2, 0xb000_0000).group(2))
        .device(DeviceSpec::new("0000:c4:00.0", 0x10de, 0x22a4, 0x068000).group(20))
        .device(DeviceSpec::new("0000:00:14.2", 0x8086, 0xa0ef, 0x068000).group(30))
        .device(DeviceSpec::new("0000:00:1f.5", 0x1022, 0x1493, 0x068000).group(31));
    let a100_switches = [
        "0000:c0:00.0",
        "0000:c1:00.0",
        "0000:c2:00.0",
        "0000:c3:00.0",
        "0000:c5:00.0",
        "0000:c6:00.0",
    ];
    for (i, address) in (10..).zip(a100_switches) {
        builder = builder.device(
            DeviceSpec::new(address, 0x10de, 0x1af1, 0x068000)
                .numa(1)
                .group(i),
        );
    }
    let inventory = scan_of(&builder);
    assert!(inventory.problems.is_empty(), "{:?}", inventory.problems);
    assert_eq!(inventory.gpus.len(), 2);
    assert!(inventory.gpus.iter().all(|g| g.model == "a100-80gb"));
    let found: Vec<(String, String, Option<u32>)> = inventory
        .nvswitches
        .iter()
        .map(|s| {
            (
                s.address.to_string(),
                nvswitch_model_name(s.device),
                s.numa_node,
            )
        })
        .collect();
    let mut want: Vec<(String, String, Option<u32>)> = a100_switches
        .iter()
        .map(|a| ((*a).to_owned(), "a100-nvswitch".to_owned(), Some(1)))
        .collect();
    want.insert(4, ("0000:c4:00.0".into(), "nvidia-22a4".into(), None));
    assert_eq!(found, want, "sorted by address, unknown id included");
    assert!(inventory.nvswitches.iter().all(|s| s.driver.is_none()));
    assert_eq!(nvswitch_model(0x1af1).map(|m| m.generation), Some(2));
}

#[test]
fn unreadable_devices_become_problems_and_the_rest_is_still_scanned() {
    let fake = presets::workstation_l40s()
        .device(DeviceSpec::nvidia_gpu("0000:04:00.0", 0x27b8, 0xb000_0000).group(20))
        .build()
        .unwrap();
    let broken = fake.device_file(&bdf("0000:04:00.0"), "vendor");
    fs::write(&broken, "garbage\n").unwrap();

    let inventory = scan(&fake.sysfs());
    assert_eq!(inventory.gpus.len(), 1);
    assert_eq!(inventory.gpus[0].model, "l40s");
    assert_eq!(
        inventory.problems,
        [format!(
            "{} holds `garbage`, which is not a 16-bit hex id",
            broken.display()
        )]
    );
}

#[test]
fn missing_sysfs_is_an_empty_inventory_with_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = scan(&Sysfs::new(dir.path().join("nothing")));
    assert!(inventory.gpus.is_empty() && inventory.nvswitches.is_empty());
    assert!(!inventory.iommu_enabled);
    assert_eq!(inventory.problems.len(), 1);
    assert!(
        inventory.problems[0].starts_with("could not read ")
            && inventory.problems[0].contains("nothing/bus/pci/devices"),
        "{:?}",
        inventory.problems
    );
}

#[test]
fn inventory_round_trips_through_json() {
    let inventory = scan_of(&presets::workstation_l40s());
    let json = serde_json::to_value(&inventory).unwrap();
    assert_eq!(json["gpus"][0]["device"]["address"], "0000:01:00.0");
    assert_eq!(json["gpus"][0]["passthrough"]["state"], "capable");
    assert_eq!(
        json["gpus"][0]["iommuGroup"]["members"][1]["role"],
        "gpu-companion"
    );
    let back: Inventory = serde_json::from_value(json).unwrap();
    assert_eq!(back, inventory);
}

/// The machines this project is built and tested on have no GPU: a scan of the
/// real `/sys` must succeed and find none, and look at every PCI function.
#[test]
fn real_sys_scan_finds_no_nvidia_gpu_and_does_not_fail() {
    let sysfs = Sysfs::default();
    let inventory = scan(&sysfs);
    assert!(inventory.gpus.is_empty(), "{:?}", inventory.gpus);
    let listed = fs::read_dir("/sys/bus/pci/devices").map_or(0, |entries| entries.count());
    assert_eq!(inventory.devices_scanned, listed);
    assert!(inventory.problems.is_empty(), "{:?}", inventory.problems);
}

#[test]
fn large_generated_tree_scans_completely() {
    let builder = presets::large(500);
    let inventory = scan_of(&builder);
    assert!(inventory.problems.is_empty(), "{:?}", inventory.problems);
    assert_eq!(inventory.gpus.len(), 100);
    let with_audio = inventory
        .gpus
        .iter()
        .filter(|g| g.companions.len() == 1)
        .count();
    assert_eq!(with_audio, 50);
    assert!(inventory.gpus.iter().all(|g| g.passthrough.is_capable()));
    let domains: BTreeSet<u16> = inventory
        .gpus
        .iter()
        .map(|g| g.address().domain())
        .collect();
    assert_eq!(domains.len(), 2, "40 blocks per domain");
}
