//! A real shim-like holder process locks a device through `devices::lock_devices`; a
//! second sandbox is refused and told who holds it; SIGKILLing the holder frees the
//! device (flock dies with the process). The holder is this test binary, re-run with
//! `lock_holder` selected.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpuvm_pci::testing::bdf;
use gpuvm_shim::devices::lock_devices;

const HOLDER_ENV: &str = "GPUVM_SHIM_LOCK_HOLDER";

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

#[test]
fn a_killed_holder_frees_its_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut holder = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "lock_holder",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_ENV, dir.path())
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
