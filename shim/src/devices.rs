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
    /// Its host NUMA node, if the host has NUMA.
    pub numa_node: Option<u32>,
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
                numa_node: device.numa_node,
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
/// A device held by another sandbox fails at once, naming its holder; so does a device
/// whose last VM has not been followed by its reset yet (a [`reset_pending_path`]
/// marker: its shim was killed and `shim delete` has not reset it yet).
pub fn lock_devices(
    lock_dir: &Path,
    devices: &[PciAddress],
    sandbox_id: &str,
) -> Result<GroupLock> {
    let lock =
        GroupLock::acquire(lock_dir, devices, sandbox_id).map_err(|source| Error::Device {
            device: devices
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            source,
        })?;
    for address in lock.addresses() {
        let marker = reset_pending_path(lock_dir, &address);
        if let Some(holder) = read_marker(&marker) {
            // Dropping `lock` releases the functions again: none of them is used.
            return Err(Error::ResetPending {
                device: address.to_string(),
                sandbox: holder,
                marker,
            });
        }
    }
    Ok(lock)
}

/// `<lock_dir>/<bdf>.reset-pending`: the marker saying that a VM of the sandbox named
/// inside may have opened the function and that it has not been reset since. Written
/// (with the lock held) before the VMM starts, removed once the function was reset
/// after the VM (or its reset failed, and its health record keeps it out of service).
/// The flock dies with a killed shim; the marker does not, so the device stays taken
/// until `shim delete` has reset it.
pub fn reset_pending_path(lock_dir: &Path, address: &PciAddress) -> PathBuf {
    lock_dir.join(format!("{address}.reset-pending"))
}

fn read_marker(path: &Path) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Some("an unknown sandbox".to_owned()),
        Ok(text) => Some(text.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        // Unreadable: assume the worst, the device may need its reset.
        Err(_) => Some("an unknown sandbox".to_owned()),
    }
}

/// Writes the reset-pending marker of every function in `devices` for `sandbox_id`
/// (atomically: temp file, fsync, rename), with their locks held, before the VMM may
/// open them.
pub fn mark_reset_pending(lock_dir: &Path, devices: &[PciAddress], sandbox_id: &str) -> Result<()> {
    use std::io::Write;
    for address in devices {
        let path = reset_pending_path(lock_dir, address);
        let tmp = lock_dir.join(format!(".{address}.reset-pending.tmp"));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(format!("{sandbox_id}\n").as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(Error::io(format!("cannot write {}", path.display())))?;
    }
    Ok(())
}

/// Removes the reset-pending markers of `devices` (missing is fine).
pub fn clear_reset_pending(lock_dir: &Path, devices: &[PciAddress]) {
    for address in devices {
        let path = reset_pending_path(lock_dir, address);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot remove the reset-pending marker")
            }
        }
    }
}

/// What the state file records of a sandbox's devices, so that `shim delete` can reset
/// them after a killed shim with the paths the shim used (the config at delete time
/// may differ, and containerd passes no runtime options to `shim delete`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceRecord {
    /// Every passed function (GPUs and companions).
    pub devices: Vec<PciAddress>,
    /// The sysfs root their resets go through.
    pub sysfs_root: PathBuf,
    /// Where their locks and reset-pending markers are.
    pub lock_dir: PathBuf,
    /// Where a failed reset is recorded.
    pub health_dir: PathBuf,
}

/// How long `shim delete` waits for a device's lock, which a sandbox that is being
/// refused (it looked at the marker) holds for a moment.
const RECLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// After a killed shim (`shim delete`, once the VMM is gone): takes the lock of every
/// recorded function whose reset-pending marker names `sandbox_id`, resets it through
/// the same [`reset_after_exit`] as a normal teardown, removes the marker, and only
/// then releases the lock. Functions whose marker is gone or names another sandbox are
/// not this sandbox's any more and are left alone; a function whose lock stays taken
/// (a live holder) keeps its marker.
pub fn reset_after_crash(record: &DeviceRecord, sandbox_id: &str) -> ResetOutcome {
    let mut ours = Vec::new();
    let mut locks = Vec::new();
    for address in &record.devices {
        match read_marker(&reset_pending_path(&record.lock_dir, address)) {
            Some(holder) if holder == sandbox_id => {}
            _ => continue,
        }
        let deadline = std::time::Instant::now() + RECLAIM_WAIT;
        let holder = format!("{sandbox_id} (shim delete: resetting)");
        loop {
            match gpuvm_pci::DeviceLock::acquire(&record.lock_dir, address, &holder) {
                Ok(lock) => {
                    locks.push(lock);
                    ours.push(*address);
                    break;
                }
                Err(gpuvm_pci::Error::Busy { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    tracing::error!(device = %address, error = %e, "cannot lock the device to reset it; its marker stays");
                    break;
                }
            }
        }
    }
    // Markers are re-read under the lock: a marker can only change with the lock held.
    ours.retain(|address| {
        read_marker(&reset_pending_path(&record.lock_dir, address)).as_deref() == Some(sandbox_id)
    });
    let outcome = reset_after_exit(&Sysfs::new(&record.sysfs_root), &record.health_dir, &ours);
    clear_reset_pending(&record.lock_dir, &ours);
    drop(locks);
    outcome
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
    fn a_device_waiting_for_its_reset_is_refused_until_shim_delete_resets_it() {
        let fake = presets::hgx_h100_8gpu().build().expect("tree");
        let gpus = [bdf("0000:18:00.0"), bdf("0000:19:00.0")];
        let record = DeviceRecord {
            devices: gpus.to_vec(),
            sysfs_root: fake.sys_root(),
            lock_dir: fake.lock_dir(),
            health_dir: fake.path().join("run/gpuvm/health"),
        };
        let held = lock_devices(&fake.lock_dir(), &gpus, "sandbox-a").expect("first");
        mark_reset_pending(&fake.lock_dir(), &gpus, "sandbox-a").expect("mark");
        // Another sandbox's marker on the second function: not sandbox-a's to reset.
        mark_reset_pending(&fake.lock_dir(), &gpus[1..], "sandbox-z").expect("mark");
        drop(held);
        let err = lock_devices(&fake.lock_dir(), &gpus[..1], "sandbox-b").expect_err("pending");
        assert!(matches!(err, Error::ResetPending { ref sandbox, .. } if sandbox == "sandbox-a"));
        assert_eq!(
            err.code(),
            containerd_shim::protos::ttrpc::Code::FAILED_PRECONDITION
        );

        let outcome = reset_after_crash(&record, "sandbox-a");
        assert_eq!(outcome.reset, gpus[..1].to_vec());
        assert_eq!(
            fake.writes(fake.device_file(&gpus[0], "reset"))
                .expect("log"),
            vec!["1"]
        );
        assert!(
            fake.writes(fake.device_file(&gpus[1], "reset"))
                .expect("log")
                .is_empty()
        );
        lock_devices(&fake.lock_dir(), &gpus[..1], "sandbox-b").expect("reset, so free");
        let err = lock_devices(&fake.lock_dir(), &gpus[1..], "sandbox-b").expect_err("z's");
        assert!(matches!(err, Error::ResetPending { ref sandbox, .. } if sandbox == "sandbox-z"));
        // Idempotent: a second delete finds no marker of its own and resets nothing.
        assert!(reset_after_crash(&record, "sandbox-a").reset.is_empty());
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
