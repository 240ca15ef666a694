//! A real shim-like holder process locks a device through `devices::lock_devices`; a
//! second sandbox is refused and told who holds it; SIGKILLing the holder frees the
//! device (flock dies with the process). The holder is this test binary, re-run with
//! `lock_holder` selected.
//!
//! A holder that got as far as starting a VMM (it marked its device reset-pending and
//! recorded it in its state file, as `Sandbox::boot` does) and is then SIGKILLed keeps
//! the device out of service until containerd's `shim delete` (the real shim binary)
//! has reset it on the fake sysfs tree: the lock is never free before the reset.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpuvm_pci::testing::{FakeSysfs, bdf, presets};
use gpuvm_shim::devices::{DeviceRecord, lock_devices, mark_reset_pending};
use gpuvm_shim::error::Error;
use gpuvm_shim::persist::SandboxRecord;

const HOLDER_ENV: &str = "GPUVM_SHIM_LOCK_HOLDER";
const VM_HOLDER_ENV: &str = "GPUVM_SHIM_VM_HOLDER";
const CRASHED: &str = "sandbox-crashing";

/// The paths a holder of `root` (a fake sysfs tree's dir) uses.
fn device_record(root: &Path) -> DeviceRecord {
    DeviceRecord {
        devices: vec![bdf("0000:18:00.0")],
        sysfs_root: root.join("sys"),
        lock_dir: root.join("run/gpuvm/devices"),
        health_dir: root.join("run/gpuvm/health"),
    }
}

#[test]
#[ignore = "the holder process of a_killed_holder_frees_its_devices; does nothing alone"]
fn lock_holder() {
    let Ok(dir) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let _lock = lock_devices(
        &PathBuf::from(dir),
        &[bdf("0000:18:00.0")],
        "sandbox-crashing",
    )
    .expect("the holder locks first");
    println!("\nHELD");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// The shim's side of a sandbox whose VMM started: the device locked, marked
/// reset-pending, and recorded in the state file in `<root>/bundle`.
#[test]
#[ignore = "the holder process of a_killed_shim_s_devices_are_reset_before_they_are_free"]
fn vm_holder() {
    let Ok(root) = std::env::var(VM_HOLDER_ENV) else {
        return;
    };
    let root = PathBuf::from(root);
    let record = device_record(&root);
    let _lock = lock_devices(&record.lock_dir, &record.devices, CRASHED).expect("locks first");
    let bundle = root.join("bundle");
    std::fs::create_dir_all(&bundle).expect("bundle");
    SandboxRecord {
        sandbox_id: CRASHED.into(),
        devices: Some(record.clone()),
        ..SandboxRecord::default()
    }
    .save(&bundle)
    .expect("state file");
    mark_reset_pending(&record.lock_dir, &record.devices, CRASHED).expect("marker");
    println!("\nHELD");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Runs this test binary's `test` with `env` set to `value`; returns once it printed
/// `HELD`.
fn spawn_holder(test: &str, env: &str, value: &Path) -> std::process::Child {
    let mut holder = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(env, value)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the holder");
    let stdout = holder.stdout.take().expect("piped");
    let held = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line == "HELD");
    assert!(held, "the holder never locked");
    holder
}

#[test]
fn a_killed_holder_frees_its_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut holder = spawn_holder("lock_holder", HOLDER_ENV, dir.path());

    let gpu = [bdf("0000:18:00.0")];
    let err = lock_devices(dir.path(), &gpu, "sandbox-next").expect_err("held");
    let message = err.full_message();
    assert!(
        message.contains(&format!("pid={} holder=sandbox-crashing", holder.id())),
        "{message}"
    );

    holder.kill().expect("SIGKILL the holder");
    holder.wait().expect("reap");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match lock_devices(dir.path(), &gpu, "sandbox-next") {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("not freed by the holder's death: {}", e.full_message()),
        }
    }
}

/// What the other sandbox saw while it tried to take the device.
struct Attempts {
    /// Refusals because the device waits for its reset.
    refused_reset_pending: usize,
    /// The reset log of the device at the moment the lock was first taken.
    resets_when_taken: Vec<String>,
}

/// Tries to lock the device for another sandbox every few milliseconds until it gets
/// it; at that moment reads the fake device's reset log.
fn take_when_free(fake: &FakeSysfs, record: &DeviceRecord) -> Attempts {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut refused_reset_pending = 0;
    loop {
        match lock_devices(&record.lock_dir, &record.devices, "sandbox-next") {
            Ok(_lock) => {
                return Attempts {
                    refused_reset_pending,
                    resets_when_taken: fake
                        .writes(fake.device_file(&record.devices[0], "reset"))
                        .expect("reset log"),
                };
            }
            Err(Error::ResetPending { sandbox, .. }) => {
                assert_eq!(sandbox, CRASHED);
                refused_reset_pending += 1;
            }
            Err(e) => assert!(
                matches!(
                    &e,
                    Error::Device {
                        source: gpuvm_pci::Error::Busy { .. },
                        ..
                    }
                ),
                "{}",
                e.full_message()
            ),
        }
        assert!(Instant::now() < deadline, "the device never became free");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_killed_shim_s_devices_are_reset_before_they_are_free() {
    let fake = presets::hgx_h100_8gpu().build().expect("fake sysfs");
    let record = device_record(fake.path());
    let reset_log = fake.device_file(&record.devices[0], "reset");
    let mut holder = spawn_holder("vm_holder", VM_HOLDER_ENV, fake.path());

    // SIGKILL the shim: its flock is gone, yet the device is not free.
    holder.kill().expect("SIGKILL the holder");
    holder.wait().expect("reap");
    std::thread::sleep(Duration::from_millis(100));
    let err = lock_devices(&record.lock_dir, &record.devices, "sandbox-next")
        .expect_err("still waiting for its reset");
    let message = err.full_message();
    assert!(
        message.contains("0000:18:00.0")
            && message.contains("waits for its reset after sandbox sandbox-crashing"),
        "{message}"
    );
    assert!(
        fake.writes(&reset_log).expect("log").is_empty(),
        "reset too early"
    );

    // Another sandbox keeps trying while containerd's `shim delete` runs.
    std::thread::scope(|s| {
        let next = s.spawn(|| take_when_free(&fake, &record));
        std::thread::sleep(Duration::from_millis(200));
        let output = Command::new(env!("CARGO_BIN_EXE_containerd-shim-gpuvm-v1"))
            .args(["-namespace", "default", "-id", CRASHED, "-bundle"])
            .arg(fake.path().join("bundle"))
            .arg("delete")
            .stderr(Stdio::piped())
            .output()
            .expect("run shim delete");
        assert!(
            output.status.success(),
            "shim delete: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let attempts = next.join().expect("the other sandbox");
        assert!(
            attempts.refused_reset_pending > 0,
            "never refused while pending"
        );
        assert_eq!(
            attempts.resets_when_taken,
            vec!["1"],
            "the lock was free before the device was reset"
        );
    });
    // The state file and the marker are gone; no health record (the reset worked).
    assert!(!fake.path().join("bundle/gpuvm-state.json").exists());
    assert!(
        !gpuvm_shim::devices::reset_pending_path(&record.lock_dir, &record.devices[0]).exists()
    );
    assert!(
        !gpuvm_shim::devices::health_record_path(&record.health_dir, &record.devices[0]).exists()
    );
}
