//! The real `gpuvm-node` binary, run with `--once --dry-run` on a fake sysfs tree and
//! on this machine's `/sys`.

use std::process::{Command, Output};

use gpuvm_pci::testing::presets;
use gpuvm_pci::{Sysfs, scan};

const BIN: &str = env!("CARGO_BIN_EXE_gpuvm-node");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("NODE_NAME")
        .env_remove("KUBECONFIG")
        .output()
        .expect("running gpuvm-node")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "gpuvm-node failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn dry_run_on_a_fake_tree_prints_the_table_and_writes_nothing() {
    let fake = presets::workstation_l40s().build().expect("building");
    let health = tempfile::tempdir().expect("temp dir");
    let sys = fake.sys_root();
    let dev = fake.dev_root();
    let output = run(&[
        "--once",
        "--dry-run",
        "--node-name",
        "ws-1",
        "--sysfs-root",
        sys.to_str().expect("utf-8 path"),
        "--dev-root",
        dev.to_str().expect("utf-8 path"),
        "--health-dir",
        health.path().to_str().expect("utf-8 path"),
    ]);
    assert_success(&output);
    let table = stdout(&output);
    for want in [
        "gpuvm-node dry run: node ws-1",
        "(nothing written)",
        "IOMMU: on   GPUs: 1   healthy: 0",
        "0000:01:00.0  l40s",
        "01:00.1:Companion",
        "bound to nvidia, not vfio-pci",
        "bind IOMMU group 12 to vfio-pci: 0000:01:00.0 (unbind from nvidia)",
        "publish GpuNode ws-1",
        "label Node ws-1: gpuvm.dev/gpu-node=true",
    ] {
        assert!(table.contains(want), "missing {want:?} in:\n{table}");
    }
    assert_eq!(
        fake.all_writes().expect("writes"),
        vec![],
        "a dry run writes nothing"
    );
}

#[test]
fn dry_run_with_no_bind_says_what_it_leaves_alone() {
    let fake = presets::a100_bound_to_nvidia().build().expect("building");
    let sys = fake.sys_root();
    let dev = fake.dev_root();
    let output = run(&[
        "--once",
        "--dry-run",
        "--no-bind",
        "--sysfs-root",
        sys.to_str().expect("utf-8 path"),
        "--dev-root",
        dev.to_str().expect("utf-8 path"),
    ]);
    assert_success(&output);
    let table = stdout(&output);
    assert!(table.contains("no node name"), "{table}");
    assert!(
        table.contains("leave 0000:31:00.0 on nvidia (binding is off: --no-bind)"),
        "{table}"
    );
    assert!(!table.contains("publish GpuNode"), "{table}");
}

#[test]
fn dry_run_on_this_machines_sys_succeeds() {
    let output = run(&["--once", "--dry-run"]);
    assert_success(&output);
    let table = stdout(&output);
    assert!(table.contains("gpuvm-node dry run"), "{table}");
    if scan(&Sysfs::new("/sys")).gpus.is_empty() {
        assert!(table.contains("no NVIDIA GPU found"), "{table}");
        assert!(table.contains("GPUs: 0"), "{table}");
    } else {
        assert!(table.contains("ADDRESS"), "{table}");
    }
}

#[test]
fn without_dry_run_a_node_name_is_required() {
    let output = run(&["--once"]);
    assert_eq!(output.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--node-name"), "{stderr}");
}

#[test]
fn help_describes_every_flag() {
    let output = run(&["--help"]);
    assert_success(&output);
    let help = stdout(&output);
    for flag in [
        "--node-name",
        "NODE_NAME",
        "--sysfs-root",
        "--dev-root",
        "--health-dir",
        "--bind",
        "--no-bind",
        "--interval",
        "--once",
        "--dry-run",
        "--log-format",
    ] {
        assert!(help.contains(flag), "missing {flag} in:\n{help}");
    }
}

#[test]
fn the_last_of_bind_and_no_bind_wins() {
    let fake = presets::workstation_l40s().build().expect("building");
    let sys = fake.sys_root();
    let sys = sys.to_str().expect("utf-8 path");
    let bound = stdout(&run(&[
        "--once",
        "--dry-run",
        "--no-bind",
        "--bind",
        "--sysfs-root",
        sys,
    ]));
    assert!(bound.contains("bind IOMMU group 12"), "{bound}");
    let unbound = stdout(&run(&[
        "--once",
        "--dry-run",
        "--bind",
        "--no-bind",
        "--sysfs-root",
        sys,
    ]));
    assert!(unbound.contains("binding is off"), "{unbound}");
}

#[test]
fn sighup_rescans_at_once_and_sigterm_exits_cleanly() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use std::time::{Duration, Instant};

    let fake = presets::workstation_l40s().build().expect("building");
    let sys = fake.sys_root();
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let mut child = Command::new(BIN)
        .args([
            "--dry-run",
            "--interval",
            "3600",
            "--log-format",
            "json",
            "--sysfs-root",
            sys.to_str().expect("utf-8 path"),
        ])
        .stdout(out.reopen().expect("reopening"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting gpuvm-node");
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let passes = || {
        std::fs::read_to_string(out.path())
            .unwrap_or_default()
            .matches("gpuvm-node dry run")
            .count()
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for("the first pass", &|| passes() >= 1);
    kill(pid, Signal::SIGHUP).expect("SIGHUP");
    wait_for("a pass on SIGHUP", &|| passes() >= 2);
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("gpuvm-node ignored SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exited with {status}");
    assert_eq!(
        passes(),
        2,
        "one pass at start, one on SIGHUP, none from the interval"
    );
}
