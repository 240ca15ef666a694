//! The sandbox's VFIO devices on the host: checked before anything starts, locked for
//! the VM's whole life, reset after it, with reset failures recorded for the node
//! agent (`/run/gpuvm/health/<bdf>`: `gpuvm_pci::HealthRecord`, the one owner of
//! that record's format).
//!
//! Everything goes through `gpuvm-pci` on a sysfs root, dev root, lock dir and health
//! dir that are parameters, so the tests run on fake trees.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gpuvm_pci::class::is_nvidia_gpu;
use gpuvm_pci::{
    GroupLock, HealthRecord, PciAddress, Sysfs, VfioGroup, check_vfio_ready, reset_device,
};

use crate::error::{Error, Result};

/// One GPU passed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassedGpu {
    /// Its host address.
    pub address: PciAddress,
    /// Its PCI device id (for the model name).
    pub device_id: u16,
}

/// The devices of a sandbox, checked ready to pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passthrough {
    /// Every function passed (GPUs and their companions), sorted.
    pub devices: Vec<PciAddress>,
    /// Their IOMMU groups.
    pub groups: Vec<VfioGroup>,
    /// The GPUs among them, sorted.
    pub gpus: Vec<PassedGpu>,
    /// Sizes of every 64-bit memory BAR of the passed functions.
    pub bar64_sizes: Vec<u64>,
}

impl Passthrough {
    /// The passed functions as text, for the VM spec.
    pub fn device_names(&self) -> Vec<String> {
        self.devices.iter().map(ToString::to_string).collect()
    }
}

fn cannot_pass(device: &PciAddress) -> impl FnOnce(gpuvm_pci::Error) -> Error + '_ {
    move |source| Error::Device {
        device: device.to_string(),
        source,
    }
}

/// Checks the devices the pod asks for (from [`crate::config::parse_devices`]), before
/// anything starts:
///
/// - each exists; each GPU's IOMMU group holds no host device (NIC, NVMe…), every
///   function to pass is bound to `vfio-pci`, and `/dev/vfio/<group>` exists
///   (`gpuvm_pci::check_vfio_ready`);
/// - every listed function that is not a GPU belongs to a listed GPU's group;
/// - groups are passed whole: every non-bridge member of each group is listed.
pub fn check_devices(
    sysfs: &Sysfs,
    dev_root: &Path,
    requested: &[PciAddress],
) -> Result<Passthrough> {
    let mut wanted: Vec<PciAddress> = Vec::with_capacity(requested.len());
    for address in requested {
        if !wanted.contains(address) {
            wanted.push(*address);
        }
    }
    let mut groups: BTreeMap<u32, VfioGroup> = BTreeMap::new();
    for address in &wanted {
        let ids = sysfs.ids(address).map_err(cannot_pass(address))?;
        if is_nvidia_gpu(ids.vendor, ids.class) {
            let group = check_vfio_ready(sysfs, dev_root, address).map_err(cannot_pass(address))?;
            groups.insert(group.number, group);
        }
    }
    for address in &wanted {
        if groups.values().any(|g| g.devices.contains(address)) {
            continue;
        }
        // Not a GPU, nor a function of a listed GPU's group: let gpuvm-pci say why
        // (not an NVIDIA GPU, no group…).
        return Err(match check_vfio_ready(sysfs, dev_root, address) {
            Err(source) => cannot_pass(address)(source),
            Ok(group) => Error::DeviceSet(format!(
                "{address} belongs to IOMMU group {}, whose GPU is not listed",
                group.number
            )),
        });
    }
    for group in groups.values() {
        if let Some(missing) = group.devices.iter().find(|d| !wanted.contains(d)) {
            let listed: Vec<String> = group
                .devices
                .iter()
                .filter(|d| wanted.contains(d))
                .map(ToString::to_string)
                .collect();
            return Err(Error::DeviceSet(format!(
                "it lists {} but not {missing}, which is in the same IOMMU group {}; \
                 a group is passed whole, so list all of {}",
                listed.join(", "),
                group.number,
                group
                    .devices
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let mut devices: Vec<PciAddress> = groups
        .values()
        .flat_map(|g| g.devices.iter().copied())
        .collect();
    devices.sort();
    let mut gpus = Vec::new();
    let mut bar64_sizes = Vec::new();
    for address in &devices {
        let device = sysfs.device(address).map_err(cannot_pass(address))?;
        if is_nvidia_gpu(device.vendor, device.class) {
            gpus.push(PassedGpu {
                address: *address,
                device_id: device.device,
            });
        }
        bar64_sizes.extend(
            device
                .bars
                .iter()
                .filter(|bar| !bar.is_io() && bar.is_64bit())
                .map(|bar| bar.size),
        );
    }
    Ok(Passthrough {
        devices,
        groups: groups.into_values().collect(),
        gpus,
        bar64_sizes,
    })
}

/// Locks every passed function for `sandbox_id` (flock: freed when the shim dies).
/// A device held by another sandbox fails at once, naming its holder.
pub fn lock_devices(
    lock_dir: &Path,
    devices: &[PciAddress],
    sandbox_id: &str,
) -> Result<GroupLock> {
    GroupLock::acquire(lock_dir, devices, sandbox_id).map_err(|source| Error::Device {
        device: devices
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        source,
    })
}

/// QEMU's q35 default 64-bit PCI hole; the window is never made smaller.
pub const QEMU_DEFAULT_HOLE64: u64 = 32 << 30;

/// The guest's 64-bit MMIO window for devices whose 64-bit BARs have these sizes: the
/// next power of two at or above twice their sum (room for alignment: every BAR is
/// naturally aligned, so a window exactly the sum rarely fits), never below
/// [`QEMU_DEFAULT_HOLE64`]. `None` without 64-bit BARs: the VMM's default is fine.
pub fn mmio64_window(bar_sizes: &[u64]) -> Option<u64> {
    let sum = bar_sizes
        .iter()
        .try_fold(0u64, |acc, size| acc.checked_add(*size));
    match sum {
        Some(0) => None,
        Some(sum) => Some(
            sum.checked_mul(2)
                .and_then(u64::checked_next_power_of_two)
                .unwrap_or(1 << 63)
                .max(QEMU_DEFAULT_HOLE64),
        ),
        None => Some(1 << 63),
    }
}

/// Cloud Hypervisor's default guest physical address width (`max_phys_bits`).
pub const CH_DEFAULT_PHYS_BITS: u8 = 46;

/// The guest physical address width Cloud Hypervisor needs so that its 64-bit MMIO
/// window (from the top of guest RAM to the top of the address space) holds `mmio64`
/// bytes: RAM above 4 GiB plus the window, never below Cloud Hypervisor's default.
/// Cloud Hypervisor uses the smaller of this and the host's own width.
pub fn guest_phys_bits(memory_bytes: u64, mmio64: u64) -> u8 {
    let top = (4u64 << 30)
        .saturating_add(memory_bytes)
        .saturating_add(mmio64);
    let bits = 64 - (top - 1).leading_zeros();
    u8::try_from(bits).unwrap_or(64).max(CH_DEFAULT_PHYS_BITS)
}

/// What [`reset_after_exit`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResetOutcome {
    /// Reset, and any old reset-failure record removed.
    pub reset: Vec<PciAddress>,
    /// Failed, with the reason written to the health record.
    pub failed: Vec<(PciAddress, String)>,
}

/// After the VMM has exited: resets every passed function through sysfs. A success
/// removes the function's reset-failure record (a later good reset puts it back into
/// service); a failure writes `<health_dir>/<bdf>` so that the node agent reports the
/// GPU unhealthy and the operator places nothing more on it.
pub fn reset_after_exit(sysfs: &Sysfs, health_dir: &Path, devices: &[PciAddress]) -> ResetOutcome {
    let mut outcome = ResetOutcome::default();
    for address in devices {
        match reset_device(sysfs, address) {
            Ok(_) => {
                if let Err(e) = HealthRecord::remove(health_dir, address) {
                    tracing::warn!(device = %address, error = %e, "cannot remove the reset-failure record");
                }
                outcome.reset.push(*address);
            }
            Err(e) => {
                let reason = error_chain(&e);
                tracing::warn!(device = %address, reason, "device reset failed");
                if let Err(e) = HealthRecord::new(&reason).write(health_dir, address) {
                    tracing::error!(device = %address, error = %e, "cannot write the reset-failure record");
                }
                outcome.failed.push((*address, reason));
            }
        }
    }
    outcome
}

/// Before a VM starts (with the locks held): a function with a reset-failure record
/// gets one more reset. Success removes the record; failure refuses the sandbox.
pub fn retry_failed_resets(sysfs: &Sysfs, health_dir: &Path, devices: &[PciAddress]) -> Result<()> {
    for address in devices {
        let record = health_record_path(health_dir, address);
        if !record.exists() {
            continue;
        }
        if let Err(source) = reset_device(sysfs, address) {
            let reason = error_chain(&source);
            // Keep the record current, so the node agent shows the latest reason.
            let _ = HealthRecord::new(&reason).write(health_dir, address);
            return Err(Error::DeviceUnhealthy(format!(
                "{address} failed its last reset and fails again ({reason}); \
                 repair it, then remove {}",
                record.display()
            )));
        }
        HealthRecord::remove(health_dir, address)
            .map_err(Error::io(format!("cannot remove {}", record.display())))?;
    }
    Ok(())
}

/// `<health_dir>/<bdf>`.
pub fn health_record_path(health_dir: &Path, address: &PciAddress) -> PathBuf {
    HealthRecord::path(health_dir, address)
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuvm_pci::testing::{DeviceSpec, FakeSysfs, SysfsBuilder, bdf, presets};

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn check(fake: &FakeSysfs, list: &[&str]) -> Result<Passthrough> {
        let addresses: Vec<PciAddress> = list.iter().map(|a| bdf(a)).collect();
        check_devices(&fake.sysfs(), &fake.dev_root(), &addresses)
    }

    fn write_health_record(dir: &Path, address: &PciAddress, reason: &str) -> std::io::Result<()> {
        HealthRecord::new(reason).write(dir, address)
    }

    /// The L40S workstation with its GPU and HDMI audio both on vfio-pci.
    fn l40s_on_vfio() -> FakeSysfs {
        presets::workstation_l40s()
            .modify("0000:01:00.0", |d| d.driver("vfio-pci"))
            .modify("0000:01:00.1", |d| d.driver("vfio-pci"))
            .build()
            .expect("tree")
    }

    #[test]
    fn ready_devices_pass_with_their_groups_gpus_and_bars() {
        let fake = presets::hgx_h100_8gpu().build().expect("tree");
        let set = check(&fake, &["0000:19:00.0", "0000:18:00.0", "0000:18:00.0"]).expect("ok");
        assert_eq!(set.devices, vec![bdf("0000:18:00.0"), bdf("0000:19:00.0")]);
        assert_eq!(set.groups.len(), 2);
        assert!(set.groups.iter().all(|g| g.device_path.exists()));
        assert_eq!(
            set.gpus.iter().map(|g| g.device_id).collect::<Vec<_>>(),
            vec![0x2330, 0x2330]
        );
        // BAR1 (128 GiB) and BAR3 (32 MiB) of each; BAR0 is 32-bit.
        assert_eq!(
            set.bar64_sizes,
            vec![128 << 30, 32 << 20, 128 << 30, 32 << 20]
        );

        let workstation = l40s_on_vfio();
        let set = check(&workstation, &["0000:01:00.0", "0000:01:00.1"]).expect("whole group");
        assert_eq!(set.device_names(), names(&["0000:01:00.0", "0000:01:00.1"]));
        assert_eq!(set.gpus.len(), 1);
    }

    #[test]
    fn each_refusal_has_a_clear_error() {
        let workstation_nvidia = presets::workstation_l40s().build().expect("tree");
        let nic = presets::gpu_shares_group_with_nic()
            .modify("0000:43:00.0", |d| d.driver("vfio-pci"))
            .build()
            .expect("tree");
        let hgx = presets::hgx_h100_8gpu().build().expect("tree");
        let hgx_group = hgx
            .sysfs()
            .iommu_group(&bdf("0000:3d:00.0"))
            .expect("read")
            .expect("group");
        std::fs::remove_file(hgx.dev_root().join(format!("vfio/{hgx_group}"))).expect("rm");
        let workstation = l40s_on_vfio();
        let off = presets::iommu_off().build().expect("tree");
        let missing_vfio = format!(
            "the VFIO group device {}",
            hgx.dev_root().join(format!("vfio/{hgx_group}")).display()
        );

        let cases: Vec<(&FakeSysfs, &[&str], &str)> = vec![
            (
                &workstation_nvidia,
                &["0000:01:00.0", "0000:01:00.1"],
                "cannot pass 0000:01:00.0 to the VM: 0000:01:00.0 is bound to nvidia, not vfio-pci",
            ),
            (
                &workstation,
                &["0000:01:00.0"],
                "it lists 0000:01:00.0 but not 0000:01:00.1, which is in the same IOMMU group 12",
            ),
            (&hgx, &["0000:3d:00.0"], &missing_vfio),
            (
                &nic,
                &["0000:43:00.0"],
                "also holds 0000:44:00.0 (Ethernet controller",
            ),
            (
                &nic,
                &["0000:44:00.0"],
                "cannot pass 0000:44:00.0 to the VM: 0000:44:00.0 (Ethernet controller",
            ),
            (
                &hgx,
                &["0000:77:00.0"],
                "PCI device 0000:77:00.0 does not exist",
            ),
            (&off, &["0000:01:00.0"], "the IOMMU is off"),
        ];
        for (fake, list, needle) in cases {
            let err = check(fake, list).expect_err(needle);
            let message = err.full_message();
            assert!(message.contains(needle), "{list:?}: {message}");
        }
    }

    #[test]
    fn a_companion_without_its_gpu_is_refused() {
        let workstation = l40s_on_vfio();
        let err = check(&workstation, &["0000:01:00.1"]).expect_err("audio alone");
        assert!(
            err.full_message().contains("is not an NVIDIA GPU"),
            "{}",
            err.full_message()
        );
    }

    #[test]
    fn a_held_device_is_refused_with_its_holder_and_freed_on_drop() {
        let fake = presets::hgx_h100_8gpu().build().expect("tree");
        let gpu = [bdf("0000:18:00.0")];
        let held = lock_devices(&fake.lock_dir(), &gpu, "sandbox-a").expect("first");
        let err = lock_devices(&fake.lock_dir(), &gpu, "sandbox-b").expect_err("busy");
        let message = err.full_message();
        assert!(message.contains("holder=sandbox-a"), "{message}");
        assert!(message.contains("0000:18:00.0 is busy"), "{message}");
        drop(held);
        lock_devices(&fake.lock_dir(), &gpu, "sandbox-b").expect("freed");
    }

    #[test]
    fn two_sandboxes_racing_for_one_device_one_wins() {
        let fake = presets::hgx_h100_8gpu().build().expect("tree");
        let lock_dir = fake.lock_dir();
        let barrier = std::sync::Barrier::new(8);
        let outcomes: Vec<Result<GroupLock>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (lock_dir, barrier) = (&lock_dir, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        lock_devices(
                            lock_dir,
                            &[bdf("0000:18:00.0"), bdf("0000:19:00.0")],
                            &format!("sandbox-{i}"),
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1);
        for err in outcomes.iter().filter_map(|o| o.as_ref().err()) {
            assert!(
                err.full_message().contains("is busy"),
                "{}",
                err.full_message()
            );
        }
    }

    #[test]
    fn mmio_window_sizes() {
        const GIB: u64 = 1 << 30;
        const MIB: u64 = 1 << 20;
        let h100 = [128 * GIB, 32 * MIB];
        let cases: Vec<(&str, Vec<u64>, Option<u64>)> = vec![
            ("no device", vec![], None),
            ("only 32-bit BARs", vec![0], None),
            ("1 x H100", h100.to_vec(), Some(512 * GIB)),
            ("2 x H100", h100.repeat(2), Some(1024 * GIB)),
            ("8 x H100", h100.repeat(8), Some(4096 * GIB)),
            ("8 x H100 BAR1 only", vec![128 * GIB; 8], Some(2048 * GIB)),
            (
                "1 x L4 (32 GiB BAR1)",
                vec![32 * GIB, 32 * MIB],
                Some(128 * GIB),
            ),
            (
                "small BARs keep QEMU's default",
                vec![256 * MIB],
                Some(32 * GIB),
            ),
            ("overflow saturates", vec![u64::MAX, 1], Some(1 << 63)),
        ];
        for (name, bars, want) in cases {
            assert_eq!(mmio64_window(&bars), want, "{name}");
        }
    }

    #[test]
    fn cloud_hypervisor_address_width() {
        const GIB: u64 = 1 << 30;
        // 64 GiB RAM + 512 GiB window fits CH's default 46 bits (64 TiB).
        assert_eq!(guest_phys_bits(64 * GIB, 512 * GIB), 46);
        // 2 TiB RAM + 4 TiB window still fits.
        assert_eq!(guest_phys_bits(2048 * GIB, 4096 * GIB), 46);
        // 32 TiB RAM + 64 TiB window needs 47 bits.
        assert_eq!(guest_phys_bits(32 * 1024 * GIB, 64 * 1024 * GIB), 47);
    }

    #[test]
    fn reset_after_exit_writes_reset_and_clears_old_records() {
        let fake = presets::hgx_h100_8gpu().build().expect("tree");
        let health = fake.path().join("run/gpuvm/health");
        let gpus = [bdf("0000:18:00.0"), bdf("0000:19:00.0")];
        write_health_record(&health, &gpus[1], "flr: old failure").expect("record");
        let outcome = reset_after_exit(&fake.sysfs(), &health, &gpus);
        assert_eq!(outcome.reset, gpus.to_vec());
        assert!(outcome.failed.is_empty());
        for gpu in &gpus {
            assert_eq!(
                fake.writes(fake.device_file(gpu, "reset")).expect("log"),
                vec!["1"]
            );
        }
        assert!(!health_record_path(&health, &gpus[1]).exists());
    }

    #[test]
    fn a_failed_reset_writes_the_health_record() {
        let fake = SysfsBuilder::new()
            .device(
                DeviceSpec::nvidia_gpu("0000:01:00.0", 0x2330, 0x9000_0000)
                    .group(5)
                    .driver("vfio-pci")
                    .no_reset(),
            )
            .device(
                DeviceSpec::nvidia_gpu("0000:02:00.0", 0x2330, 0xa000_0000)
                    .group(6)
                    .driver("vfio-pci"),
            )
            .build()
            .expect("tree");
        // A `reset` that cannot be written (a directory): the kernel refusing the reset.
        let second = bdf("0000:02:00.0");
        std::fs::remove_file(fake.device_file(&second, "reset")).expect("rm");
        std::fs::create_dir(fake.device_file(&second, "reset")).expect("mkdir");
        let health = fake.path().join("run/gpuvm/health");
        let devices = [bdf("0000:01:00.0"), second];
        let outcome = reset_after_exit(&fake.sysfs(), &health, &devices);
        assert!(outcome.reset.is_empty());
        assert_eq!(outcome.failed.len(), 2);
        let first = std::fs::read_to_string(health.join("0000:01:00.0")).expect("record");
        assert!(
            first.starts_with("0000:01:00.0 cannot be reset: it has no reset method"),
            "{first}"
        );
        let second_record = std::fs::read_to_string(health.join("0000:02:00.0")).expect("record");
        assert!(
            second_record.starts_with("could not write `1` to"),
            "{second_record}"
        );
        // Atomic: no temp file left behind.
        let names: Vec<String> = std::fs::read_dir(&health)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        // The next sandbox retries the reset: still failing, it is refused.
        let err = retry_failed_resets(&fake.sysfs(), &health, &devices[..1]).expect_err("refused");
        assert!(
            err.full_message().contains("failed its last reset"),
            "{}",
            err.full_message()
        );
    }

    #[test]
    fn a_later_good_reset_clears_the_record_before_boot() {
        let fake = presets::hgx_h100_8gpu().build().expect("tree");
        let health = fake.path().join("run/gpuvm/health");
        let gpu = bdf("0000:18:00.0");
        write_health_record(&health, &gpu, "bus: timed out").expect("record");
        retry_failed_resets(&fake.sysfs(), &health, &[gpu, bdf("0000:19:00.0")]).expect("ok");
        assert!(!health_record_path(&health, &gpu).exists());
        assert_eq!(
            fake.writes(fake.device_file(&gpu, "reset")).expect("log"),
            vec!["1"]
        );
        // No record, no reset.
        assert!(
            fake.writes(fake.device_file(&bdf("0000:19:00.0"), "reset"))
                .expect("log")
                .is_empty()
        );
    }
}
