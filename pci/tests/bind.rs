//! Binding to vfio-pci and resetting, asserted by the exact sysfs writes.

use std::fs;

use gpuvm_pci::testing::{DeviceSpec, FakeSysfs, SysfsBuilder, bdf, presets};
use gpuvm_pci::{
    Error, SysfsWrite, bind_group_to_vfio, check_vfio_ready, reset_device, scan, vfio_group_device,
};

fn write(fake: &FakeSysfs, path: &str, value: &str) -> SysfsWrite {
    SysfsWrite {
        path: fake.sys_root().join(path),
        value: value.to_owned(),
    }
}

fn owned(writes: &[(&str, &str)]) -> Vec<(String, String)> {
    writes
        .iter()
        .map(|(path, value)| (path.to_string(), value.to_string()))
        .collect()
}

#[test]
fn binding_the_l40s_writes_override_unbind_and_probe_for_gpu_then_audio() {
    let fake = presets::workstation_l40s().build().unwrap();
    let sysfs = fake.sysfs();
    let gpu = bdf("0000:01:00.0");

    let report = bind_group_to_vfio(&sysfs, &gpu).unwrap();
    assert_eq!(report.group, 12);
    assert_eq!(report.devices, [gpu, bdf("0000:01:00.1")]);
    assert_eq!(
        report.writes,
        [
            write(
                &fake,
                "bus/pci/devices/0000:01:00.0/driver_override",
                "vfio-pci"
            ),
            write(&fake, "bus/pci/drivers/nvidia/unbind", "0000:01:00.0"),
            write(&fake, "bus/pci/drivers_probe", "0000:01:00.0"),
            write(
                &fake,
                "bus/pci/devices/0000:01:00.1/driver_override",
                "vfio-pci"
            ),
            write(
                &fake,
                "bus/pci/drivers/snd_hda_intel/unbind",
                "0000:01:00.1"
            ),
            write(&fake, "bus/pci/drivers_probe", "0000:01:00.1"),
        ]
    );
    // What the files hold is what was written, and nothing else in the tree changed.
    assert_eq!(
        fake.writes("bus/pci/drivers_probe").unwrap(),
        ["0000:01:00.0", "0000:01:00.1"]
    );
    assert_eq!(
        fake.all_writes().unwrap(),
        owned(&[
            ("bus/pci/drivers/nvidia/unbind", "0000:01:00.0"),
            ("bus/pci/drivers/snd_hda_intel/unbind", "0000:01:00.1"),
            ("bus/pci/drivers_probe", "0000:01:00.0"),
            ("bus/pci/drivers_probe", "0000:01:00.1"),
            (
                "devices/pci0000:00/0000:00:01.1/0000:01:00.0/driver_override",
                "vfio-pci"
            ),
            (
                "devices/pci0000:00/0000:00:01.1/0000:01:00.1/driver_override",
                "vfio-pci"
            ),
        ])
    );
}

#[test]
fn binding_is_idempotent_once_the_kernel_has_bound_the_group() {
    let fake = presets::workstation_l40s().build().unwrap();
    let sysfs = fake.sysfs();
    let gpu = bdf("0000:01:00.0");

    let err = check_vfio_ready(&sysfs, &fake.dev_root(), &gpu).unwrap_err();
    assert_eq!(
        err.to_string(),
        "0000:01:00.0 is bound to nvidia, not vfio-pci"
    );

    bind_group_to_vfio(&sysfs, &gpu).unwrap();
    fake.settle().unwrap();
    let before = fake.all_writes().unwrap();

    let again = bind_group_to_vfio(&sysfs, &gpu).unwrap();
    assert!(again.writes.is_empty(), "{:?}", again.writes);
    assert_eq!(again.devices, [gpu, bdf("0000:01:00.1")]);
    assert_eq!(fake.all_writes().unwrap(), before, "no new sysfs writes");

    let ready = check_vfio_ready(&sysfs, &fake.dev_root(), &gpu).unwrap();
    assert_eq!(ready.number, 12);
    assert_eq!(ready.devices, [gpu, bdf("0000:01:00.1")]);
    assert_eq!(ready.device_path, fake.dev_root().join("vfio/12"));
    assert!(scan(&sysfs).gpus[0].group_bound_to_vfio());
}

#[test]
fn already_bound_gpu_gets_no_writes_and_a_gpu_on_nvidia_gets_three() {
    let fake = presets::a100_bound_to_nvidia().build().unwrap();
    let sysfs = fake.sysfs();

    let bound = bind_group_to_vfio(&sysfs, &bdf("0000:b1:00.0")).unwrap();
    assert!(bound.writes.is_empty());
    assert!(fake.all_writes().unwrap().is_empty());

    let report = bind_group_to_vfio(&sysfs, &bdf("0000:31:00.0")).unwrap();
    assert_eq!(
        report.writes,
        [
            write(
                &fake,
                "bus/pci/devices/0000:31:00.0/driver_override",
                "vfio-pci"
            ),
            write(&fake, "bus/pci/drivers/nvidia/unbind", "0000:31:00.0"),
            write(&fake, "bus/pci/drivers_probe", "0000:31:00.0"),
        ]
    );
}

#[test]
fn unbound_gpu_with_override_set_only_needs_a_probe() {
    let fake = presets::a100_bound_to_nvidia()
        .modify("0000:31:00.0", DeviceSpec::no_driver)
        .build()
        .unwrap();
    let gpu = bdf("0000:31:00.0");
    fs::write(fake.device_file(&gpu, "driver_override"), "vfio-pci\n").unwrap();
    let report = bind_group_to_vfio(&fake.sysfs(), &gpu).unwrap();
    assert_eq!(
        report.writes,
        [write(&fake, "bus/pci/drivers_probe", "0000:31:00.0")]
    );
}

#[test]
fn group_with_a_nic_is_refused_before_any_write() {
    let fake = presets::gpu_shares_group_with_nic().build().unwrap();
    let err = bind_group_to_vfio(&fake.sysfs(), &bdf("0000:43:00.0")).unwrap_err();
    assert!(
        matches!(
            err,
            Error::HostDeviceInGroup { group: 31, member, vendor: 0x15b3, class: 0x020000, .. }
                if member == bdf("0000:44:00.0")
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "cannot pass 0000:43:00.0 through: its IOMMU group 31 also holds 0000:44:00.0 \
         (Ethernet controller, vendor 0x15b3, class 0x020000), a device the host uses"
    );
    assert!(fake.all_writes().unwrap().is_empty());

    // The other GPU, alone in its group, binds.
    let report = bind_group_to_vfio(&fake.sysfs(), &bdf("0000:c1:00.0")).unwrap();
    assert_eq!(report.writes.len(), 3);
}

#[test]
fn group_with_nvme_names_the_nvme() {
    let fake = SysfsBuilder::new()
        .device(DeviceSpec::nvidia_gpu("0000:01:00.0", 0x2331, 0xa000_0000).group(7))
        .device(DeviceSpec::new("0000:01:00.1", 0x144d, 0xa80a, 0x010802).group(7))
        .build()
        .unwrap();
    let err = bind_group_to_vfio(&fake.sysfs(), &bdf("0000:01:00.0")).unwrap_err();
    assert!(
        err.to_string().contains(
            "0000:01:00.1 (Non-Volatile memory controller, vendor 0x144d, class 0x010802)"
        ),
        "{err}"
    );
    assert!(fake.all_writes().unwrap().is_empty());
}

#[test]
fn iommu_off_is_refused_before_any_write() {
    let fake = presets::iommu_off().build().unwrap();
    let err = bind_group_to_vfio(&fake.sysfs(), &bdf("0000:01:00.0")).unwrap_err();
    assert!(matches!(err, Error::IommuDisabled { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with("cannot pass 0000:01:00.0 through: the IOMMU is off (")
            && message.contains("kernel/iommu_groups has no groups"),
        "{message}"
    );
    assert!(fake.all_writes().unwrap().is_empty());
    let err = check_vfio_ready(&fake.sysfs(), &fake.dev_root(), &bdf("0000:01:00.0")).unwrap_err();
    assert!(matches!(err, Error::IommuDisabled { .. }), "{err:?}");
}

#[test]
fn vfio_pci_not_loaded_is_refused_before_any_write() {
    let fake = presets::workstation_l40s()
        .without_vfio_pci()
        .build()
        .unwrap();
    let err = bind_group_to_vfio(&fake.sysfs(), &bdf("0000:01:00.0")).unwrap_err();
    assert!(matches!(err, Error::VfioDriverMissing { .. }), "{err:?}");
    assert!(err.to_string().ends_with("run `modprobe vfio-pci`"));
    assert!(fake.all_writes().unwrap().is_empty());
}

#[test]
fn only_nvidia_gpus_that_exist_are_bound() {
    let fake = presets::hgx_h100_8gpu().build().unwrap();
    let sysfs = fake.sysfs();
    let err = bind_group_to_vfio(&sysfs, &bdf("0000:29:00.0")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "0000:29:00.0 (InfiniBand controller, vendor 0x15b3, class 0x020700) is not an NVIDIA GPU"
    );
    let err = bind_group_to_vfio(&sysfs, &bdf("0000:06:00.0")).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotAGpu {
                class: 0x068000,
                ..
            }
        ),
        "NVSwitches are not passed yet"
    );
    let err = bind_group_to_vfio(&sysfs, &bdf("0000:ee:00.0")).unwrap_err();
    assert!(matches!(err, Error::NoSuchDevice { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("PCI device 0000:ee:00.0 does not exist")
    );
    assert!(fake.all_writes().unwrap().is_empty());
}

#[test]
fn missing_dev_vfio_group_is_an_error_naming_the_path() {
    let fake = presets::hgx_h100_8gpu().build().unwrap();
    let sysfs = fake.sysfs();
    let gpu = bdf("0000:18:00.0");
    let ready = check_vfio_ready(&sysfs, &fake.dev_root(), &gpu).unwrap();
    assert_eq!(
        vfio_group_device(&fake.dev_root(), &gpu, ready.number).unwrap(),
        ready.device_path
    );

    fs::remove_file(&ready.device_path).unwrap();
    let err = check_vfio_ready(&sysfs, &fake.dev_root(), &gpu).unwrap_err();
    assert!(
        matches!(err, Error::VfioGroupDeviceMissing { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "the VFIO group device {} for 0000:18:00.0 does not exist; \
             is the group bound to vfio-pci?",
            ready.device_path.display()
        )
    );
}

#[test]
fn reset_writes_one_to_the_reset_file() {
    let fake = presets::hgx_h100_8gpu().build().unwrap();
    let gpu = bdf("0000:3d:00.0");
    let methods = reset_device(&fake.sysfs(), &gpu).unwrap();
    assert_eq!(methods, ["flr", "bus"]);
    assert_eq!(
        fake.all_writes().unwrap(),
        owned(&[(
            "devices/pci0000:3a/0000:3a:01.0/0000:3b:00.0/0000:3c:00.0/0000:3d:00.0/reset",
            "1"
        )])
    );
}

#[test]
fn reset_without_a_method_is_an_error() {
    let fake = presets::hgx_h100_8gpu()
        .modify("0000:18:00.0", DeviceSpec::no_reset)
        .build()
        .unwrap();
    let gpu = bdf("0000:18:00.0");
    let err = reset_device(&fake.sysfs(), &gpu).unwrap_err();
    assert!(matches!(err, Error::NoResetMethod { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "0000:18:00.0 cannot be reset: it has no reset method ({} is empty or missing)",
            fake.device_file(&gpu, "reset").display()
        )
    );

    // A `reset` file with an empty `reset_method` (all methods disabled) is refused too.
    let other = bdf("0000:19:00.0");
    fs::write(fake.device_file(&other, "reset_method"), "\n").unwrap();
    let err = reset_device(&fake.sysfs(), &other).unwrap_err();
    assert!(
        err.to_string().contains("reset_method is empty or missing"),
        "{err}"
    );
    assert!(fake.all_writes().unwrap().is_empty());
}

#[test]
fn two_gpus_in_one_group_are_bound_together_and_bridges_are_left_alone() {
    let fake = SysfsBuilder::new()
        .device(DeviceSpec::bridge("0000:40:01.0", 0x8086, 0x352a).group(5))
        .device(
            DeviceSpec::bridge("0000:41:00.0", 0x10b5, 0x8747)
                .parent("0000:40:01.0")
                .group(6),
        )
        .device(
            DeviceSpec::bridge("0000:42:08.0", 0x10b5, 0x8747)
                .parent("0000:41:00.0")
                .group(6),
        )
        .device(
            DeviceSpec::bridge("0000:42:10.0", 0x10b5, 0x8747)
                .parent("0000:41:00.0")
                .group(6),
        )
        .device(
            DeviceSpec::nvidia_gpu("0000:43:00.0", 0x26b5, 0xa000_0000)
                .parent("0000:42:08.0")
                .group(6)
                .driver("nvidia"),
        )
        .device(
            DeviceSpec::nvidia_gpu("0000:44:00.0", 0x26b5, 0xb000_0000)
                .parent("0000:42:10.0")
                .group(6),
        )
        .build()
        .unwrap();
    let report = bind_group_to_vfio(&fake.sysfs(), &bdf("0000:44:00.0")).unwrap();
    assert_eq!(report.devices, [bdf("0000:43:00.0"), bdf("0000:44:00.0")]);
    assert_eq!(
        report.writes,
        [
            write(
                &fake,
                "bus/pci/devices/0000:43:00.0/driver_override",
                "vfio-pci"
            ),
            write(&fake, "bus/pci/drivers/nvidia/unbind", "0000:43:00.0"),
            write(&fake, "bus/pci/drivers_probe", "0000:43:00.0"),
            // Unbound: nothing to unbind.
            write(
                &fake,
                "bus/pci/devices/0000:44:00.0/driver_override",
                "vfio-pci"
            ),
            write(&fake, "bus/pci/drivers_probe", "0000:44:00.0"),
        ]
    );
    assert!(
        fake.writes("bus/pci/drivers/pcieport/unbind")
            .unwrap()
            .is_empty()
    );

    fake.settle().unwrap();
    let inventory = scan(&fake.sysfs());
    assert_eq!(inventory.gpus.len(), 2);
    assert!(inventory.gpus.iter().all(|gpu| gpu.group_bound_to_vfio()));
    assert!(fake.dev_root().join("vfio/6").exists());
}

#[test]
fn gpu_without_a_group_while_the_iommu_is_on_is_refused() {
    let fake = presets::workstation_l40s()
        .device(DeviceSpec::nvidia_gpu("0000:05:00.0", 0x27b8, 0xb000_0000).driver("nvidia"))
        .build()
        .unwrap();
    let gpu = bdf("0000:05:00.0");
    let err = bind_group_to_vfio(&fake.sysfs(), &gpu).unwrap_err();
    assert!(matches!(err, Error::NoIommuGroup { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("cannot pass 0000:05:00.0 through: it has no IOMMU group")
    );
    let inventory = scan(&fake.sysfs());
    let lonely = inventory.gpus.iter().find(|g| g.address() == gpu).unwrap();
    assert!(!lonely.passthrough.is_capable());
    assert!(fake.all_writes().unwrap().is_empty());
}
