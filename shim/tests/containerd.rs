//! The real thing: containerd 2.x (from `scripts/containerd-deps.sh`) on private dirs
//! inside `unshare --net`, the `gpuvm` runtime pointing at the built shim, a hand-made
//! busybox OCI image, and `ctr run --runtime io.containerd.gpuvm.v1`. The container
//! runs in a QEMU VM with the guest image from `guest/build.sh`. Every test ends by
//! checking that nothing is left behind (VM processes, shims, mounts, sockets).
//!
//! Needs what `common` lists; prints `SKIPPED: <reason>` and passes when something is
//! missing.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Containerd, IMAGE, Plugins, Setup, ShimSettings, busybox_image, processes_mentioning, run,
    setup_or_skip, spec_with_args, start_containerd, test_dir,
};
use gpuvm_testkit::Requirement;
use serde_json::json;

/// What a container run should show.
const SCRIPT: &str = "echo hello from the vm; uname -r; echo oops >&2; exit 3";

/// A unique container id for this test process.
fn unique_id(what: &str) -> String {
    format!("gpuvm-test-{}-{what}", std::process::id())
}

/// `ctr run` with the gpuvm runtime and the test's shim config `shim_config`.
fn ctr_run(containerd: &Containerd, shim_config: &Path) -> Command {
    let mut ctr = containerd.ctr();
    ctr.args(["run", "--runtime", "io.containerd.gpuvm.v1"])
        // containerd's ConfigPath runtime option names the shim's config file.
        .arg("--runtime-config-path")
        .arg(shim_config);
    ctr
}

/// Starts containerd, imports the image, runs one container with `extra_args`
/// (before the image name), checks its output, exit status and that nothing is
/// left behind.
fn run_container(extra_args: &[&str], with_spec_file: bool) {
    let Some(s) = setup_or_skip() else { return };
    let dir = test_dir();
    let image = busybox_image(dir.path());
    let id = unique_id(if with_spec_file { "spec" } else { "image" });
    let containerd = start_containerd(&s, dir.path(), &ShimSettings::new(&s), &Plugins::CtrOnly);
    run(containerd.ctr().args(["images", "import"]).arg(&image));

    let started = Instant::now();
    let mut ctr = ctr_run(&containerd, &containerd.shim_config);
    ctr.arg("--rm").args(extra_args);
    if with_spec_file {
        ctr.arg("--config")
            .arg(spec_with_args(dir.path(), &["/bin/sh", "-c", SCRIPT]))
            .arg(&id);
    } else {
        ctr.args([IMAGE, &id, "/bin/sh", "-c", SCRIPT]);
    }
    let out = ctr.output().expect("ctr run");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let context = || {
        format!(
            "stdout:\n{stdout}\nstderr:\n{stderr}\ncontainerd log (tail):\n{}",
            containerd.log_tail()
        )
    };
    assert!(stdout.contains("hello from the vm"), "{}", context());
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(s.guest_dir.join("manifest.json")).unwrap_or_default(),
    )
    .unwrap_or_default();
    if let Some(release) = manifest.get("kernel_release").and_then(|r| r.as_str()) {
        assert!(
            stdout.contains(release),
            "not the guest kernel {release}: {}",
            context()
        );
    }
    assert!(
        stderr.contains("oops"),
        "stderr not forwarded: {}",
        context()
    );
    assert_eq!(out.status.code(), Some(3), "exit status: {}", context());
    println!("ctr run in a VM took {:?}", started.elapsed());
    containerd.assert_nothing_left_behind(&[&id]);
}

#[test]
fn ctr_run_with_a_minimal_spec_runs_in_a_vm_and_leaves_nothing_behind() {
    run_container(&[], true);
}

#[test]
fn ctr_run_with_ctr_default_spec_from_an_image() {
    run_container(&[], false);
}

/// A container plants symlinks in its rootfs, which sits in the VM's virtio-fs share
/// (to `/`, to `/etc`, a loop, one inside a directory) and exits: the shim's
/// teardown follows none of them, the host's `/` and `/etc` hold what they held, and
/// nothing is left behind.
#[test]
fn symlinks_a_container_plants_in_the_share_are_not_followed_at_teardown() {
    let Some(s) = setup_or_skip() else { return };
    let names = |dir: &str| -> std::collections::BTreeSet<String> {
        std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    };
    let (root_before, etc_before) = (names("/"), names("/etc"));
    let dir = test_dir();
    busybox_image(dir.path());
    let id = unique_id("symlinks");
    let containerd = start_containerd(&s, dir.path(), &ShimSettings::new(&s), &Plugins::CtrOnly);
    let script = "ln -s / /to-root && ln -s /etc /to-etc && ln -s loop /loop && \
                  mkdir -p /d && ln -s /etc /d/etc && ln -s /d /d/self && echo planted";
    let out = ctr_run(&containerd, &containerd.shim_config)
        .args(["--rm", "--config"])
        .arg(spec_with_args(dir.path(), &["/bin/sh", "-c", script]))
        .arg(&id)
        .stdin(Stdio::null())
        .output()
        .expect("ctr run");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("planted"),
        "stdout {:?} stderr {:?}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        containerd.log_tail()
    );
    assert_eq!(out.status.code(), Some(0), "{}", containerd.log_tail());
    containerd.assert_nothing_left_behind(&[&id]);
    assert_eq!(names("/"), root_before);
    assert_eq!(names("/etc"), etc_before);
}

/// `ctr run` with piped stdin: what is piped into ctr reaches the container's stdin
/// (`cat` echoes it back), and the end of the input ends `cat`.
#[test]
fn stdin_reaches_the_container() {
    let Some(s) = setup_or_skip() else { return };
    let dir = test_dir();
    busybox_image(dir.path());
    let id = unique_id("stdin");
    let containerd = start_containerd(&s, dir.path(), &ShimSettings::new(&s), &Plugins::CtrOnly);
    let mut child = ctr_run(&containerd, &containerd.shim_config)
        .args(["--rm", "--config"])
        .arg(spec_with_args(dir.path(), &["/bin/cat"]))
        .arg(&id)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr run -i");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"line one through stdin\nline two\n")
        .expect("write stdin");
    drop(stdin);
    let out = child.wait_with_output().expect("ctr run -i");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("line one through stdin") && stdout.contains("line two"),
        "stdout {stdout:?} stderr {:?}\n{}",
        String::from_utf8_lossy(&out.stderr),
        containerd.log_tail()
    );
    assert_eq!(out.status.code(), Some(0), "{}", containerd.log_tail());
    containerd.assert_nothing_left_behind(&[&id]);
}

/// `ctr run -t` under `script` (which gives ctr a pty): the container's process has a
/// terminal on stdin and stdout, and its output and exit status arrive.
#[test]
fn terminal_output_arrives() {
    let Some(s) = setup_or_skip() else { return };
    let Some(script) = common::find_binary("SCRIPT_BIN", "script") else {
        gpuvm_testkit::skip(
            Requirement::Containerd,
            "script (util-linux) not found: it gives ctr a terminal",
        );
        return;
    };
    let dir = test_dir();
    busybox_image(dir.path());
    let id = unique_id("tty");
    let containerd = start_containerd(&s, dir.path(), &ShimSettings::new(&s), &Plugins::CtrOnly);
    let spec = spec_with_args(
        dir.path(),
        // `tty` would need /dev/pts in the container; `-t` asks isatty() directly.
        &[
            "/bin/sh",
            "-c",
            "[ -t 0 ] && [ -t 1 ] && echo terminal-ok && exit 4",
        ],
    );
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spec).expect("read spec")).expect("spec");
    value["process"]["terminal"] = json!(true);
    std::fs::write(&spec, serde_json::to_vec(&value).expect("json")).expect("write spec");
    let ctr = ctr_run(&containerd, &containerd.shim_config);
    let mut line: Vec<String> = vec![ctr.get_program().to_string_lossy().into_owned()];
    line.extend(ctr.get_args().map(|a| a.to_string_lossy().into_owned()));
    line.extend([
        "--rm".into(),
        "-t".into(),
        "--config".into(),
        spec.display().to_string(),
        id.clone(),
    ]);
    let out = Command::new(script)
        .args(["-q", "-e", "-c", &line.join(" "), "/dev/null"])
        .stdin(Stdio::piped())
        .output()
        .expect("script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("terminal-ok"),
        "stdout {stdout:?} stderr {:?}\n{}",
        String::from_utf8_lossy(&out.stderr),
        containerd.log_tail()
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "{stdout}\n{}",
        containerd.log_tail()
    );
    containerd.assert_nothing_left_behind(&[&id]);
}

/// Runs `ctr run --rm` of `args` with shim `settings`, expects it to fail with an
/// error naming `expected`, removes the container as an operator would, and checks
/// that nothing is left behind.
fn run_expecting_failure(
    settings: impl FnOnce(&Setup, &Path) -> ShimSettings,
    args: &[&str],
    what: &str,
    expected: &[&str],
) {
    run_expecting_failure_with(settings, args, &[], what, expected);
}

fn run_expecting_failure_with(
    settings: impl FnOnce(&Setup, &Path) -> ShimSettings,
    args: &[&str],
    annotations: &[(&str, &str)],
    what: &str,
    expected: &[&str],
) {
    let Some(s) = setup_or_skip() else { return };
    let dir = test_dir();
    busybox_image(dir.path());
    let id = unique_id(what);
    let containerd = start_containerd(&s, dir.path(), &ShimSettings::new(&s), &Plugins::CtrOnly);
    let shim_config = dir.path().join("failing-shim.toml");
    common::write_shim_config(&s, &settings(&s, dir.path()), &shim_config);
    let started = Instant::now();
    let out = ctr_run(&containerd, &shim_config)
        .arg("--rm")
        .arg("--config")
        .arg(common::spec_with_args_and_annotations(
            dir.path(),
            args,
            annotations,
        ))
        .arg(&id)
        .stdin(Stdio::null())
        .output()
        .expect("ctr run");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "ctr run should fail: {stderr}\n{}",
        containerd.log_tail()
    );
    for needle in expected {
        assert!(
            stderr.contains(needle),
            "ctr's error should say {needle:?}: {stderr}\n{}",
            containerd.log_tail()
        );
    }
    println!(
        "{what}: failed in {:?} with: {}",
        started.elapsed(),
        stderr.trim()
    );
    // ctr leaves the container record when the task never started.
    let _ = containerd
        .ctr()
        .args(["task", "delete", "-f", &id])
        .output();
    let _ = containerd.ctr().args(["container", "delete", &id]).output();
    containerd.assert_nothing_left_behind(&[&id]);
}

#[test]
fn missing_kernel_is_a_clear_error() {
    run_expecting_failure(
        |s, dir| ShimSettings {
            kernel: dir.join("no-such-vmlinux"),
            ..ShimSettings::new(s)
        },
        &["/bin/true"],
        "nokernel",
        &["guest kernel", "no-such-vmlinux", "does not exist"],
    );
}

/// The `[host]` section pointing the shim at a fake sysfs tree.
fn fake_host_toml(fake: &gpuvm_pci::testing::FakeSysfs) -> String {
    format!(
        "[host]\nsysfs_root = \"{}\"\ndev_root = \"{}\"\nlock_dir = \"{}\"\nhealth_dir = \"{}\"\ngpu_check_dir = \"{}\"\n",
        fake.sys_root().display(),
        fake.dev_root().display(),
        fake.lock_dir().display(),
        fake.path().join("run/gpuvm/health").display(),
        fake.path().join("run/gpuvm/gpu-check").display(),
    )
}

#[test]
fn a_gpu_not_on_vfio_pci_is_refused_before_the_vm_starts() {
    let fake = gpuvm_pci::testing::presets::workstation_l40s()
        .build()
        .expect("fake sysfs");
    let extra_toml = fake_host_toml(&fake);
    run_expecting_failure_with(
        |s, _| ShimSettings {
            extra_toml,
            ..ShimSettings::new(s)
        },
        &["/bin/true"],
        &[("gpuvm.dev/devices", "0000:01:00.0,0000:01:00.1")],
        "novfio",
        &[
            "cannot pass 0000:01:00.0 to the VM",
            "0000:01:00.0 is bound to nvidia, not vfio-pci",
        ],
    );
}

#[test]
fn a_device_held_by_another_sandbox_is_refused_naming_the_holder() {
    let fake = gpuvm_pci::testing::presets::hgx_h100_8gpu()
        .build()
        .expect("fake sysfs");
    let gpu = gpuvm_pci::testing::bdf("0000:18:00.0");
    let _held =
        gpuvm_pci::GroupLock::acquire(&fake.lock_dir(), &[gpu], "sandbox-first").expect("lock");
    let extra_toml = fake_host_toml(&fake);
    run_expecting_failure_with(
        |s, _| ShimSettings {
            extra_toml,
            ..ShimSettings::new(s)
        },
        &["/bin/true"],
        &[("gpuvm.dev/devices", "0000:18:00.0")],
        "busy",
        &["0000:18:00.0 is busy", "holder=sandbox-first"],
    );
}

#[test]
fn a_gpu_pod_without_the_gpu_image_is_refused_naming_the_key() {
    let fake = gpuvm_pci::testing::presets::hgx_h100_8gpu()
        .build()
        .expect("fake sysfs");
    let extra_toml = fake_host_toml(&fake);
    run_expecting_failure_with(
        |s, dir| ShimSettings {
            extra_toml,
            gpu_initramfs: dir.join("no-such-initramfs-gpu.img"),
            ..ShimSettings::new(s)
        },
        &["/bin/true"],
        &[("gpuvm.dev/devices", "0000:18:00.0")],
        "nogpuimage",
        &[
            "the pod has GPUs, and the GPU guest image",
            "no-such-initramfs-gpu.img does not exist",
            "set guest.gpu_initramfs in the shim config",
        ],
    );
    // The device was checked and locked, and released again.
    let gpu = gpuvm_pci::testing::bdf("0000:18:00.0");
    gpuvm_pci::GroupLock::acquire(&fake.lock_dir(), &[gpu], "after").expect("the lock is free");
}

#[test]
fn missing_vmm_binary_is_a_clear_error() {
    run_expecting_failure(
        |s, dir| ShimSettings {
            qemu: dir.join("no-such-qemu"),
            ..ShimSettings::new(s)
        },
        &["/bin/true"],
        "novmm",
        &["cannot start qemu", "no-such-qemu"],
    );
}

#[test]
fn an_agent_that_never_answers_times_out() {
    run_expecting_failure(
        |s, dir| ShimSettings {
            initramfs: sleeping_initramfs(dir),
            agent_connect_secs: 10,
            ..ShimSettings::new(s)
        },
        &["/bin/true"],
        "noagent",
        &["timed out after 10s", "guest agent"],
    );
}

#[test]
fn a_command_missing_in_the_guest_reaches_ctr() {
    run_expecting_failure(
        |s, _| ShimSettings::new(s),
        &["/bin/no-such-command"],
        "nocmd",
        &["/bin/no-such-command", "not found"],
    );
}

/// A `newc` cpio entry.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        u32::try_from(data.len()).expect("small file"),
        0,
        0,
        0,
        0,
        u32::try_from(name.len() + 1).expect("short name"),
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// An initramfs whose `/init` boots and sleeps: a guest without an agent.
fn sleeping_initramfs(dir: &Path) -> PathBuf {
    let busybox = std::fs::read("/bin/busybox").expect("read busybox");
    let mut cpio = Vec::new();
    cpio_entry(&mut cpio, 1, "bin", 0o040_755, &[]);
    cpio_entry(&mut cpio, 2, "bin/busybox", 0o100_755, &busybox);
    cpio_entry(&mut cpio, 3, "bin/sh", 0o120_777, b"busybox");
    cpio_entry(&mut cpio, 4, "bin/sleep", 0o120_777, b"busybox");
    cpio_entry(
        &mut cpio,
        5,
        "init",
        0o100_755,
        b"#!/bin/sh\nexec /bin/sleep 100000\n",
    );
    cpio_entry(&mut cpio, 0, "TRAILER!!!", 0, &[]);
    let path = dir.join("sleeping-initramfs.cpio");
    std::fs::write(&path, cpio).expect("write initramfs");
    path
}

/// The shim is SIGKILLed while its VM boots: containerd's cleanup (`shim delete`)
/// must kill the VM and its helpers and unmount everything.
#[test]
fn shim_killed_mid_start_leaves_nothing_behind() {
    let Some(s) = setup_or_skip() else { return };
    let dir = test_dir();
    busybox_image(dir.path());
    let id = unique_id("killed");
    let containerd = start_containerd(&s, dir.path(), &ShimSettings::new(&s), &Plugins::CtrOnly);
    // A guest that never answers keeps the shim in its start for as long as we like.
    let shim_config = dir.path().join("hanging-shim.toml");
    common::write_shim_config(
        &s,
        &ShimSettings {
            initramfs: sleeping_initramfs(dir.path()),
            ..ShimSettings::new(&s)
        },
        &shim_config,
    );
    let ctr = ctr_run(&containerd, &shim_config)
        .args(["-d", "--config"])
        .arg(spec_with_args(dir.path(), &["/bin/sleep", "600"]))
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr run -d");
    let work_dir = format!("{}/{id}/", common::RUN_DIR);
    let deadline = Instant::now() + Duration::from_secs(60);
    let shim_pid = loop {
        let vm_up = processes_mentioning(&work_dir)
            .iter()
            .any(|p| p.contains("qemu-system"));
        let shim = processes_mentioning(&format!("-id {id} "))
            .into_iter()
            .find(|p| !p.trim_end().ends_with(" start") && !p.contains(" delete"));
        if let (true, Some(shim)) = (vm_up, shim) {
            break shim
                .split(':')
                .next()
                .and_then(|p| p.parse::<i32>().ok())
                .expect("pid");
        }
        assert!(
            Instant::now() < deadline,
            "the VM never started\n{}",
            containerd.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        !processes_mentioning(&work_dir).is_empty(),
        "the VM should be running"
    );
    // SAFETY: kill(2) of the shim's pid, just read from /proc; no memory effects here.
    assert_eq!(unsafe { libc::kill(shim_pid, libc::SIGKILL) }, 0);
    let out = ctr.wait_with_output().expect("ctr run -d");
    assert!(
        !out.status.success(),
        "ctr run should fail when its shim dies: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    containerd.assert_nothing_left_behind(&[&id]);
    let _ = containerd.ctr().args(["container", "delete", &id]).output();
}

/// A long-running container: exec into it (stdout, stderr, exit status), read its
/// pids and metrics, kill it, delete it, and check that nothing is left behind.
#[test]
fn exec_kill_and_delete_in_a_running_vm() {
    let Some(s) = setup_or_skip() else { return };
    let dir = test_dir();
    busybox_image(dir.path());
    let id = format!("gpuvm-test-{}-exec", std::process::id());
    let containerd = start_containerd(&s, dir.path(), &ShimSettings::new(&s), &Plugins::CtrOnly);
    let spec = spec_with_args(dir.path(), &["/bin/sleep", "600"]);
    let context = || containerd.log_tail();
    let out = containerd
        .ctr()
        .args([
            "run",
            "-d",
            "--runtime",
            "io.containerd.gpuvm.v1",
            "--runtime-config-path",
        ])
        .arg(&containerd.shim_config)
        .arg("--config")
        .arg(&spec)
        .arg(&id)
        .output()
        .expect("ctr run -d");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        context()
    );

    let exec = containerd
        .ctr()
        .args(["task", "exec", "--exec-id", "e1", &id])
        .args(["/bin/sh", "-c", "echo from exec; echo exec-err >&2; exit 5"])
        .output()
        .expect("ctr task exec");
    let stdout = String::from_utf8_lossy(&exec.stdout);
    let stderr = String::from_utf8_lossy(&exec.stderr);
    assert!(
        stdout.contains("from exec"),
        "stdout {stdout:?} stderr {stderr:?}\n{}",
        context()
    );
    assert!(
        stderr.contains("exec-err"),
        "stderr {stderr:?}\n{}",
        context()
    );
    assert_eq!(exec.status.code(), Some(5), "{}", context());

    let ps = containerd
        .ctr()
        .args(["task", "ps", &id])
        .output()
        .expect("ctr task ps");
    assert!(
        ps.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&ps.stderr),
        context()
    );
    let metrics = containerd
        .ctr()
        .args(["task", "metrics", &id])
        .output()
        .expect("ctr task metrics");
    assert!(
        metrics.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&metrics.stderr),
        context()
    );
    let pause = containerd
        .ctr()
        .args(["task", "pause", &id])
        .output()
        .expect("pause");
    assert!(!pause.status.success(), "pause must be refused");
    assert!(
        String::from_utf8_lossy(&pause.stderr).contains("not supported"),
        "{}",
        String::from_utf8_lossy(&pause.stderr)
    );

    run(containerd
        .ctr()
        .args(["task", "kill", "-s", "SIGKILL", &id]));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = containerd
            .ctr()
            .args(["task", "ls"])
            .output()
            .expect("task ls");
        let list = String::from_utf8_lossy(&out.stdout).into_owned();
        if list
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("STOPPED"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "task did not stop: {list}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    run(containerd.ctr().args(["task", "delete", &id]));
    run(containerd.ctr().args(["container", "delete", &id]));

    containerd.assert_nothing_left_behind(&[&id]);
}

/// The pod flow CRI drives, through ctr: a pod sandbox task (the VM itself, grouped by
/// `io.kubernetes.cri.sandbox-id`), then an app container that joins the same shim and
/// VM, then stop and removal in CRI's order, and nothing left behind.
#[test]
fn pod_sandbox_and_app_container_share_one_vm() {
    let Some(s) = setup_or_skip() else { return };
    let dir = test_dir();
    busybox_image(dir.path());
    let pod = format!("gpuvm-test-{}-pod", std::process::id());
    let app = format!("{pod}-app");
    let containerd = start_containerd(&s, dir.path(), &ShimSettings::new(&s), &Plugins::CtrOnly);
    let context = || containerd.log_tail();
    let spec_for = |name: &str, kind: &str, args: &[&str]| {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).expect("mkdir");
        std::fs::create_dir_all(sub.join("rootfs")).expect("mkdir");
        let path = spec_with_args(dir.path(), args);
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("spec");
        spec["annotations"] = json!({
            "io.kubernetes.cri.container-type": kind,
            "io.kubernetes.cri.sandbox-id": pod,
            "gpuvm.dev/cpus": "1",
            "gpuvm.dev/memory": "384Mi",
            // What containerd's CRI plugin adds for a Pod of 1 CPU and 384Mi.
            "io.kubernetes.cri.sandbox-cpu-period": "100000",
            "io.kubernetes.cri.sandbox-cpu-quota": "100000",
            "io.kubernetes.cri.sandbox-cpu-shares": "1024",
            "io.kubernetes.cri.sandbox-memory": "402653184",
        });
        let out = sub.join("spec.json");
        std::fs::write(&out, serde_json::to_vec(&spec).expect("json")).expect("write");
        out
    };
    let run_detached = |id: &str, spec: &Path| {
        let out = containerd
            .ctr()
            .args([
                "run",
                "-d",
                "--runtime",
                "io.containerd.gpuvm.v1",
                "--runtime-config-path",
            ])
            .arg(&containerd.shim_config)
            .arg("--config")
            .arg(spec)
            .arg(id)
            .output()
            .expect("ctr run -d");
        assert!(
            out.status.success(),
            "{id}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            context()
        );
    };

    // The pod sandbox: its task is the VM; its pid is the VMM's.
    run_detached(&pod, &spec_for("pod", "sandbox", &["/bin/sleep", "600"]));
    let vmm_pids = processes_mentioning(&format!("-name gpuvm-{pod}"));
    assert_eq!(vmm_pids.len(), 1, "one VMM for the pod: {vmm_pids:?}");
    let vmm_pid = vmm_pids[0].split(':').next().expect("pid").to_owned();
    let tasks = containerd
        .ctr()
        .args(["task", "ls"])
        .output()
        .expect("task ls");
    let tasks = String::from_utf8_lossy(&tasks.stdout).into_owned();
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with(&pod) && l.contains(&vmm_pid) && l.contains("RUNNING")),
        "pod task should run with the VMM's pid {vmm_pid}: {tasks}"
    );

    // The app container joins the same shim and VM.
    run_detached(&app, &spec_for("app", "container", &["/bin/sleep", "600"]));
    assert_eq!(
        processes_mentioning("qemu-system-x86_64 -name gpuvm-gpuvm-test-")
            .iter()
            .filter(|p| p.contains(&pod))
            .count(),
        1,
        "the app container must not start a second VM"
    );
    let exec = containerd
        .ctr()
        .args([
            "task",
            "exec",
            "--exec-id",
            "e1",
            &app,
            "/bin/sh",
            "-c",
            "echo in app",
        ])
        .output()
        .expect("exec");
    assert!(
        String::from_utf8_lossy(&exec.stdout).contains("in app"),
        "{}\n{}",
        String::from_utf8_lossy(&exec.stderr),
        context()
    );

    // CRI's stop order: app Kill(15), Kill(9, all), Delete; then the sandbox.
    run(containerd
        .ctr()
        .args(["task", "kill", "-s", "SIGTERM", &app]));
    // If SIGTERM already ended it, SIGKILL answers NotFound ("already finished"), which
    // CRI ignores, as with runc.
    let kill = containerd
        .ctr()
        .args(["task", "kill", "-a", "-s", "SIGKILL", &app])
        .output()
        .expect("kill -a");
    assert!(
        kill.status.success() || String::from_utf8_lossy(&kill.stderr).contains("already finished"),
        "{}",
        String::from_utf8_lossy(&kill.stderr)
    );
    let wait_stopped = |id: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = containerd
                .ctr()
                .args(["task", "ls"])
                .output()
                .expect("task ls");
            let list = String::from_utf8_lossy(&out.stdout).into_owned();
            if list
                .lines()
                .any(|l| l.starts_with(&format!("{id} ")) && l.contains("STOPPED"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id} did not stop: {list}\n{}",
                context()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_stopped(&app);
    run(containerd.ctr().args(["task", "delete", &app]));
    run(containerd.ctr().args(["container", "delete", &app]));
    run(containerd
        .ctr()
        .args(["task", "kill", "-s", "SIGKILL", &pod]));
    wait_stopped(&pod);
    run(containerd.ctr().args(["task", "delete", &pod]));
    run(containerd.ctr().args(["container", "delete", &pod]));

    containerd.assert_nothing_left_behind(&[&pod, &app]);
}

/// What a killed containerd leaves mounted under its state dir (a CRI sandbox's
/// `/dev/shm`) is detached by the harness, names with spaces included, so the test's
/// temp dir can go.
#[test]
fn the_harness_detaches_what_a_killed_containerd_left_mounted() {
    // SAFETY: geteuid(2) has no side effects.
    if unsafe { libc::geteuid() } != 0 {
        gpuvm_testkit::skip(Requirement::Root, "mounting a tmpfs needs root");
        return;
    }
    let dir = test_dir();
    let state = dir.path().join("state");
    let points = [
        state.join("sandboxes/a/shm"),
        state.join("sandboxes/b c/shm"),
    ];
    let mounted = |p: &Path| {
        let escaped = p.display().to_string().replace(' ', "\\040");
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(escaped.as_str()))
    };
    for p in &points {
        std::fs::create_dir_all(p).unwrap();
        common::run(Command::new("mount").args(["-t", "tmpfs", "shm"]).arg(p));
        assert!(mounted(p), "{} not mounted", p.display());
    }
    // A mount beside the state dir is not touched.
    let beside = dir.path().join("stateful");
    std::fs::create_dir_all(&beside).unwrap();
    common::run(
        Command::new("mount")
            .args(["-t", "tmpfs", "x"])
            .arg(&beside),
    );
    common::unmount_under(&state);
    for p in &points {
        assert!(!mounted(p), "{} still mounted", p.display());
    }
    assert!(
        mounted(&beside),
        "a mount outside the state dir was detached"
    );
    common::unmount_under(&beside);
    assert!(!mounted(&beside));
}
