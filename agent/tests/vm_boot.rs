//! Boots the real guest image (guest/build.sh) under QEMU TCG with vhost-user vsock
//! (vhost-device-vsock) and a virtio-fs share (virtiofsd), and drives the agent over
//! the hybrid-vsock socket, exactly as the shim will.
//!
//! Prints `SKIPPED: <reason>` (through `gpuvm-testkit`) and passes when QEMU,
//! vhost-device-vsock, virtiofsd or the image is missing; fails instead under
//! `GPUVM_REQUIRE=qemu`. `scripts/vm-deps.sh` installs the tools and `guest/build.sh`
//! builds the image; `GPUVM_GUEST_DIR` points elsewhere than `.work/guest`.

// Test helpers outside `#[test]` fns may panic on failure too.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::vm::*;
use common::*;
use gpuvm_protocol::agent as pb;
use gpuvm_testkit::Requirement;
use protobuf::MessageField;

/// Small enough that the OOM case fills it quickly under TCG.
const MEMORY: &str = "256M";

/// What a container with the default spec checks about its own mounts.
const DEFAULT_SPEC_SCRIPT: &str = "set -e
for d in /proc/self /dev/pts /dev/shm /dev/mqueue /sys/kernel /sys/fs/cgroup; do test -d $d; done
test -c /dev/null; test -c /dev/zero; test -c /dev/urandom; test -L /dev/ptmx
echo discarded > /dev/null
head -c 4 /dev/zero | wc -c
grep -cE '^devpts /dev/pts devpts |^mqueue /dev/mqueue mqueue |^sysfs /sys sysfs ro,|^cgroup2 /sys/fs/cgroup cgroup2 ro,|^tmpfs /dev tmpfs |^shm /dev/shm tmpfs ' /proc/mounts
echo done";

fn guest_dir() -> PathBuf {
    match std::env::var_os("GPUVM_GUEST_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.work/guest"),
    }
}

/// Boots the small image (`guest/build.sh`) with its busybox rootfs at [`ROOTFS`].
fn boot_guest() -> Option<Guest> {
    boot(&Image {
        dir: guest_dir(),
        initramfs: None,
        rootfs: "busybox-rootfs",
        memory: MEMORY,
        cmdline: String::new(),
        requirement: Requirement::Qemu,
        build_hint: "guest/build.sh",
    })
}

fn host_kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[test]
fn boots_the_guest_and_runs_a_container() {
    let test_start = Instant::now();
    let Some(guest) = boot_guest() else { return };
    let Guest {
        client,
        share,
        console,
        manifest,
        ready,
        mut children,
        _tmp,
    } = guest;
    let console_log = || std::fs::read_to_string(&console).unwrap_or_default();
    let info = client
        .guest_info(ctx(), &pb::GuestInfoRequest::new())
        .unwrap();
    assert!(
        manifest.contains(&format!("\"kernel_release\": \"{}\"", info.kernel_release)),
        "guest kernel {} is not the packed one: {manifest}",
        info.kernel_release
    );
    assert!(
        info.kernel_cmdline.contains("gpuvm.share="),
        "{}",
        info.kernel_cmdline
    );
    assert_eq!(info.shared_dir, "/run/gpuvm/shared");
    assert!(
        info.loaded_modules.iter().any(|m| m == "virtiofs"),
        "{:?}",
        info.loaded_modules
    );

    let (stdout, stderr, exit) = run(
        &client,
        "c1",
        ROOTFS,
        process(&["sh", "-c", "echo hello; exit 3"]),
    );
    assert_eq!(stdout, "hello\n", "stderr: {stderr}");
    assert_eq!(exit.exit_status, 3);
    assert!(!exit.oom_killed);

    // The container sees its own root, on the share, with /proc mounted.
    let (stdout, stderr, exit) = run(
        &client,
        "c2",
        "/run/gpuvm/shared/c1/rootfs",
        process(&[
            "sh",
            "-c",
            "cat /etc/passwd | grep -c nobody; ls /proc/self/ns/mnt",
        ]),
    );
    assert_eq!(
        (stdout.as_str(), exit.exit_status),
        ("1\n/proc/self/ns/mnt\n", 0),
        "{stderr}"
    );

    let err = create_and_start(
        &client,
        "c3",
        "/run/gpuvm/shared/c1/rootfs",
        process(&["no-such-cmd"]),
    )
    .unwrap_err();
    let (code, message) = status_of(err);
    assert_eq!(code, ttrpc::Code::NOT_FOUND, "{message}");
    delete(&client, "c3", "");

    let (code, message) = status_of(
        client
            .gpu_info(ctx(), &pb::GpuInfoRequest::new())
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    assert!(message.contains("no NVIDIA driver"), "{message}");

    // containerd's default spec: a tmpfs over /dev, then devpts and more inside it.
    create_request_and_start(
        &client,
        &pb::CreateProcessRequest {
            container_id: "default-spec".into(),
            rootfs: ROOTFS.into(),
            process: MessageField::some(process(&["sh", "-c", DEFAULT_SPEC_SCRIPT])),
            mounts: containerd_default_mounts(),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("default spec: {e:?}\nconsole:\n{}", console_log()));
    let (stdout, stderr, exit) = finish(&client, "default-spec");
    assert_eq!(
        (stdout.as_str(), exit.exit_status),
        ("4\n6\ndone\n", 0),
        "stderr: {stderr}"
    );
    assert!(!exit.oom_killed);

    // A bind mount of a missing source fails clearly at start.
    let mut mounts = containerd_default_mounts();
    mounts.push(oci_mount("/data", "bind", "/no/such/dir", &["rbind"]));
    let err = create_request_and_start(
        &client,
        &pb::CreateProcessRequest {
            container_id: "missing-bind".into(),
            rootfs: ROOTFS.into(),
            process: MessageField::some(process(&["true"])),
            mounts,
            ..Default::default()
        },
    )
    .unwrap_err();
    let (code, message) = status_of(err);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{message}");
    assert!(
        message.contains("/no/such/dir of the bind mount at /data does not exist"),
        "{message}"
    );
    delete(&client, "missing-bind", "");

    // More than the guest's memory: the kernel kills `tail`, the shell reports 137.
    let oom_start = Instant::now();
    let (_, stderr, exit) = run(
        &client,
        "oom",
        ROOTFS,
        process(&["sh", "-c", "head -c 629145600 /dev/zero | tail"]),
    );
    assert!(
        exit.oom_killed,
        "not reported OOM-killed: exit {} signal {}; stderr {stderr}",
        exit.exit_status, exit.signal
    );
    assert_eq!(exit.exit_status, 137, "{stderr}");
    println!("OOM case took {:.2?}", oom_start.elapsed());

    let stats = client.stats(ctx(), &pb::StatsRequest::new()).unwrap();
    assert!(stats.agent_hwm_bytes >= stats.agent_rss_bytes);
    assert!(info.agent_listening_uptime_ns > 0);
    println!(
        "guest kernel {} (host {}); boot to agent ready {:.2?}; guest memory {} MiB total, {} MiB available",
        info.kernel_release,
        host_kernel_release(),
        ready,
        stats.mem_total_bytes >> 20,
        stats.mem_available_bytes >> 20,
    );
    // Figures for the README (printed, not asserted: TCG timings vary with load).
    println!("AGENT_RSS_KB={}", stats.agent_rss_bytes >> 10);
    println!("AGENT_HWM_KB={}", stats.agent_hwm_bytes >> 10);
    println!(
        "BOOT_TO_LISTEN_MS={}",
        info.agent_listening_uptime_ns / 1_000_000
    );
    println!("QEMU_START_TO_PING_MS={}", ready.as_millis());

    // Shutdown with processes running: one that ignores SIGTERM and a background
    // child. The agent kills and reaps them all, syncs, and powers off.
    let marker = share.join("c1/rootfs/shutdown-marker");
    create_and_start(
        &client,
        "long",
        ROOTFS,
        process(&[
            "sh",
            "-c",
            "trap '' TERM; sleep 1000 & echo written > /shutdown-marker; wait",
        ]),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    // The shell creates the file before `echo` writes it: wait for the content.
    while std::fs::read_to_string(&marker).ok().as_deref() != Some("written\n") {
        assert!(
            Instant::now() < deadline,
            "the long container never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    client.shutdown(ctx(), &pb::ShutdownRequest::new()).unwrap();
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    let qemu = children
        .0
        .iter_mut()
        .find(|(name, _)| *name == "qemu")
        .unwrap();
    let status = loop {
        if let Some(status) = qemu.1.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU did not exit after Shutdown\nconsole:\n{}",
            console_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "QEMU exited with {status}");
    assert!(
        console_log().contains("every process killed and reaped"),
        "console:\n{}",
        console_log()
    );
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "written\n");
    // virtiofsd exits with its VM; vhost-device-vsock serves the next VM, so it is
    // stopped by pid here.
    let deadline = Instant::now() + Duration::from_secs(5);
    while children.still_running().contains(&"virtiofsd") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(children);
    println!("vm test total {:.2?}", test_start.elapsed());
}

/// `CapEff`, `CapBnd`, `NoNewPrivs` and `Seccomp` of the container's shell.
const STATUS_LINES: &str = "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status";

fn with_mounts(id: &str, process: pb::ProcessSpec) -> pb::CreateProcessRequest {
    default_spec_request(id, ROOTFS, process)
}

fn new_namespaces(kinds: &[&str]) -> Vec<pb::Namespace> {
    kinds
        .iter()
        .map(|kind| pb::Namespace {
            type_: (*kind).into(),
            ..Default::default()
        })
        .collect()
}

/// The pod's `securityContext` as the OCI spec carries it, applied by the agent in
/// the real guest: capabilities, user, seccomp, pid and uts namespaces.
#[test]
fn the_guest_applies_each_containers_process_security() {
    let Some(guest) = boot_guest() else { return };
    let client = &guest.client;
    let run_request = |req: &pb::CreateProcessRequest| {
        create_request_and_start(client, req).unwrap_or_else(|e| {
            panic!(
                "{}: {e:?}\nconsole:\n{}",
                req.container_id,
                guest.console_log()
            )
        });
        finish(client, &req.container_id)
    };

    // capabilities: drop ALL → mount is refused; the same container with its
    // capabilities unset (the agent's: all of them) mounts, so the refusal is theirs.
    let script = format!("{STATUS_LINES}; mount -t tmpfs t /tmp && echo MOUNTED");
    let mut spec = process(&["sh", "-c", &script]);
    spec.capabilities = MessageField::some(pb::Capabilities::default());
    let (stdout, stderr, exit) = run_request(&with_mounts("nocaps", spec));
    assert!(stdout.contains("CapEff:\t0000000000000000"), "{stdout}");
    assert!(stdout.contains("CapBnd:\t0000000000000000"), "{stdout}");
    assert!(!stdout.contains("MOUNTED"), "{stdout}");
    // busybox's words for EPERM from mount(2).
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert_ne!(exit.exit_status, 0);
    let (stdout, stderr, exit) =
        run_request(&with_mounts("allcaps", process(&["sh", "-c", &script])));
    assert!(stdout.contains("MOUNTED"), "{stdout} {stderr}");
    assert_eq!(exit.exit_status, 0, "{stderr}");

    // runAsUser 1000, runAsGroup 1000, a supplementary group, no_new_privs.
    let mut spec = process(&["sh", "-c", &format!("id -u; id -G; {STATUS_LINES}")]);
    spec.uid = 1000;
    spec.gid = 1000;
    spec.additional_gids = vec![44];
    spec.no_new_privileges = true;
    let (stdout, stderr, exit) = run_request(&with_mounts("user", spec));
    assert_eq!(exit.exit_status, 0, "{stderr}");
    assert!(stdout.starts_with("1000\n1000 44\n"), "{stdout}");
    assert!(stdout.contains("CapEff:\t0000000000000000"), "{stdout}");
    assert!(stdout.contains("NoNewPrivs:\t1"), "{stdout}");

    // seccomp: mkdir/mkdirat → EPERM; other syscalls (touch) still work.
    let mut req = with_mounts(
        "seccomp",
        process(&[
            "sh",
            "-c",
            &format!(
                "{STATUS_LINES}; busybox mkdir /tmp/made && echo MADE; echo x > /tmp/file && echo WROTE"
            ),
        ]),
    );
    req.seccomp = MessageField::some(pb::Seccomp {
        default_action: "SCMP_ACT_ALLOW".into(),
        syscalls: vec![pb::SeccompSyscall {
            names: vec!["mkdir".into(), "mkdirat".into()],
            action: "SCMP_ACT_ERRNO".into(),
            errno_ret: Some(libc::EPERM as u32),
            ..Default::default()
        }],
        ..Default::default()
    });
    let (stdout, stderr, _) = run_request(&req);
    assert!(stdout.contains("Seccomp:\t2"), "{stdout}");
    assert!(!stdout.contains("MADE"), "{stdout}");
    assert!(stdout.contains("WROTE"), "{stdout}");
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
    assert!(!guest.share.join("c1/rootfs/tmp/made").exists());

    // pid namespaces: two containers of the pod with their own do not see each
    // other; one sharing the pod's does.
    let list =
        "echo self=$$; for f in /proc/[0-9]*/cmdline; do busybox tr '\\0' ' ' < $f; echo; done";
    let mut sleeper = with_mounts("sleeper", process(&["sleep", "4242"]));
    sleeper.namespaces = new_namespaces(&["pid"]);
    create_request_and_start(client, &sleeper).unwrap();
    let mut own = with_mounts("own", process(&["sh", "-c", list]));
    own.namespaces = new_namespaces(&["pid", "ipc", "uts"]);
    let (stdout, stderr, exit) = run_request(&own);
    assert_eq!(exit.exit_status, 0, "{stderr}");
    assert!(stdout.starts_with("self=1\n"), "{stdout}");
    assert!(!stdout.contains("sleep 4242"), "{stdout}");
    assert!(!stdout.contains("/init"), "{stdout}");
    let (stdout, stderr, exit) = run_request(&with_mounts("shared", process(&["sh", "-c", list])));
    assert_eq!(exit.exit_status, 0, "{stderr}");
    assert!(stdout.contains("sleep 4242"), "{stdout}");
    signal(client, "sleeper", 9, false);
    assert_eq!(wait(client, "sleeper", "").signal, 9);
    delete(client, "sleeper", "");

    // A uts namespace of its own: the container renames itself, the guest keeps
    // its name.
    let before = client
        .guest_info(ctx(), &pb::GuestInfoRequest::new())
        .unwrap()
        .hostname;
    let mut uts = with_mounts(
        "uts",
        process(&["sh", "-c", "busybox hostname renamed; busybox hostname"]),
    );
    uts.namespaces = new_namespaces(&["uts"]);
    let (stdout, stderr, exit) = run_request(&uts);
    assert_eq!(
        (stdout.as_str(), exit.exit_status),
        ("renamed\n", 0),
        "{stderr}"
    );
    let after = client
        .guest_info(ctx(), &pb::GuestInfoRequest::new())
        .unwrap()
        .hostname;
    assert_eq!(before, after);
    assert_ne!(after, "renamed");
}
