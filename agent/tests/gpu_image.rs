//! Boots the GPU flavour of the guest image (`guest/build.sh --gpu`) under QEMU TCG,
//! without a GPU, with `gpuvm.nvidia=load`: the NVIDIA modules are tried (they load,
//! or `nvidia` says there is no device) without a panic, `GpuInfo` answers with the
//! modules, nodes and the driver's error, and a container from `probe-rootfs` finds
//! `libcuda.so.1` and `libnvidia-ml.so.1` where the dynamic linker looks (`dlopen`
//! and `ldconfig -p`), while an opted-out one gets nothing and a rootfs with planted
//! symlinks cannot redirect the injection onto the guest.
//!
//! Prints `SKIPPED: <reason>` and passes without the image (`gpu-image`) or QEMU and
//! its helpers (`qemu`); fails instead when `GPUVM_REQUIRE` names them.
//! `GPUVM_GUEST_GPU_DIR` points elsewhere than `.work/guest-gpu`.

// Test helpers outside `#[test]` fns may panic on failure too.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::vm::*;
use common::*;
use gpuvm_protocol::agent as pb;
use gpuvm_testkit::Requirement;
use protobuf::MessageField;

/// The initramfs holds the driver (hundreds of MiB unpacked).
const MEMORY: &str = "2G";
const PROBE: &str = "set -e
dlopen-probe libcuda.so.1 libnvidia-ml.so.1
ldconfig -p | grep -E 'libcuda.so.1 |libnvidia-ml.so.1 ' | sed 's/ (.*=>/ =>/'
readlink /usr/lib/x86_64-linux-gnu/libcuda.so.1
echo nodes: $(ls /dev | grep nvidia)
echo read-only binds: $(grep -c ' /usr/lib/x86_64-linux-gnu/lib[^ ]* ro,nosuid,nodev' /proc/self/mountinfo)";

fn gpu_guest_dir() -> PathBuf {
    match std::env::var_os("GPUVM_GUEST_GPU_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.work/guest-gpu"),
    }
}

/// A copy of the image's `probe-rootfs` on the share, as a new container's snapshot
/// would be (the injection leaves its mount points and links in a rootfs, as runc
/// does); returns its guest path.
fn fresh_rootfs(guest: &Guest, name: &str) -> String {
    copy_tree(
        &gpu_guest_dir().join("probe-rootfs"),
        &guest.share.join(name).join("rootfs"),
    );
    format!("/run/gpuvm/shared/{name}/rootfs")
}

/// A container of `probe-rootfs` with containerd's default mounts.
fn probe_request(id: &str, rootfs: &str, script: &str, env: &[&str]) -> pb::CreateProcessRequest {
    let mut spec = process(&["sh", "-c", script]);
    spec.env.extend(env.iter().map(|e| e.to_string()));
    default_spec_request(id, rootfs, spec)
}

/// Runs a request to its end: (stdout, stderr, exit status).
fn run_request(guest: &Guest, req: &pb::CreateProcessRequest) -> (String, String, u32) {
    create_request_and_start(&guest.client, req).unwrap_or_else(|e| {
        panic!(
            "{}: {e:?}\nconsole:\n{}",
            req.container_id,
            guest.console_log()
        )
    });
    let (stdout, stderr, exit) = finish(&guest.client, &req.container_id);
    (stdout, stderr, exit.exit_status)
}

#[test]
fn the_gpu_image_loads_the_driver_and_gives_containers_its_libraries() {
    let Some(guest) = boot(&Image {
        dir: gpu_guest_dir(),
        initramfs: None,
        rootfs: "probe-rootfs",
        memory: MEMORY,
        cmdline: "gpuvm.nvidia=load".into(),
        requirement: Requirement::GpuImage,
        build_hint: "guest/build.sh --gpu",
    }) else {
        return;
    };
    println!(
        "GPU_IMAGE_QEMU_START_TO_PING_MS={}",
        guest.ready.as_millis()
    );
    let ctx = || ttrpc::context::with_timeout(0);

    // The modules: loaded, or nvidia refused for want of a device; never a panic.
    let info = guest
        .client
        .gpu_info(ctx(), &pb::GpuInfoRequest::new())
        .unwrap_or_else(|e| panic!("GpuInfo: {e:?}\nconsole:\n{}", guest.console_log()));
    println!(
        "GPU_INFO modules={:?} device_nodes={:?} driver_error={:?} gpus={} xids={}",
        info.modules,
        info.device_nodes,
        info.driver_error,
        info.gpus.len(),
        info.xid_events.len()
    );
    if info.modules.iter().any(|m| m == "nvidia") {
        assert!(
            info.device_nodes.iter().any(|n| n == "/dev/nvidiactl"),
            "{info:?}"
        );
    } else {
        assert_eq!(info.driver_error, "nvidia: No such device", "{info:?}");
        assert!(info.device_nodes.is_empty(), "{info:?}");
    }
    assert!(info.gpus.is_empty(), "no GPU was passed: {info:?}");
    let console = guest.console_log();
    for bad in ["Kernel panic", "BUG:", "Oops", "Call Trace"] {
        assert!(!console.contains(bad), "{bad} in the console:\n{console}");
    }

    // The NVML helper runs in the guest's root on the image's glibc and finds NVML;
    // without a GPU NVML says the driver is not loaded.
    let (check, stderr, _) = run_request(
        &guest,
        &pb::CreateProcessRequest {
            container_id: "gpu-check".into(),
            process: MessageField::some(pb::ProcessSpec {
                args: vec!["/usr/bin/gpuvm-gpu-check".into()],
                env: vec!["LD_LIBRARY_PATH=/usr/lib/gpuvm/nvidia".into()],
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    println!("GPU_CHECK: {check}{stderr}");
    let nvml = gpuvm_agent::gpu::parse_check_output(&check).unwrap_err();
    assert!(
        nvml.starts_with("There is no NVIDIA driver in the guest: ")
            && !nvml.contains("cannot open"),
        "{nvml}"
    );

    // What the driver said, from the guest's kernel log.
    let (log, _, _) = run_request(
        &guest,
        &probe_request(
            "dmesg",
            ROOTFS,
            "dmesg | grep -iE 'nvidia|nvrm' | tail -n 20",
            &[],
        ),
    );
    println!("GUEST_NVIDIA_LOG:\n{log}");

    // A container finds the libraries where the dynamic linker looks.
    let (stdout, stderr, status) = run_request(&guest, &probe_request("probe", ROOTFS, PROBE, &[]));
    println!("PROBE:\n{stdout}{stderr}");
    assert_eq!(status, 0, "stdout: {stdout}\nstderr: {stderr}");
    for wanted in [
        "ok libcuda.so.1",
        "ok libnvidia-ml.so.1",
        "libcuda.so.1 => /usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "libnvidia-ml.so.1 => /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
    ] {
        assert!(
            stdout.contains(wanted),
            "{wanted:?} missing from:\n{stdout}"
        );
    }
    let line = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_default()
            .to_string()
    };
    let binds: u32 = line("read-only binds: ").trim().parse().unwrap_or(0);
    assert!(
        binds >= 2,
        "libcuda and libnvidia-ml are not bound read-only:\n{stdout}"
    );
    let nodes = line("nodes: ");
    let nodes: Vec<&str> = nodes.split_whitespace().collect();
    for node in &info.device_nodes {
        let name = node.trim_start_matches("/dev/");
        assert!(
            nodes.contains(&name),
            "{node} not in the container: {nodes:?}"
        );
    }

    // Opted out: by the environment, by the pod annotation.
    let absent = "test ! -e /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1 && \
                  ! grep -q /usr/lib/x86_64-linux-gnu/libcuda /proc/self/mountinfo && echo absent";
    let void = probe_request(
        "void",
        &fresh_rootfs(&guest, "void"),
        absent,
        &["NVIDIA_VISIBLE_DEVICES=void"],
    );
    let mut sidecar = probe_request("sidecar", &fresh_rootfs(&guest, "sidecar"), absent, &[]);
    sidecar.annotations = HashMap::from([
        ("io.kubernetes.cri.container-name".into(), "sidecar".into()),
        ("gpuvm.dev/no-gpu-containers".into(), "sidecar".into()),
    ]);
    for req in [void, sidecar] {
        let (stdout, stderr, status) = run_request(&guest, &req);
        assert_eq!(
            (stdout.as_str(), status),
            ("absent\n", 0),
            "{}: {stderr}",
            req.container_id
        );
    }

    planted_symlinks_stay_in_the_rootfs(&guest);
    let console = guest.console_log();
    let agent_lines: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("NVIDIA") || l.contains("ldconfig") || l.contains("WARN"))
        .collect();
    println!("CONSOLE (agent):\n{}", agent_lines.join("\n"));
}

/// The driver version of the contract (`550.163.01-*` from Debian trixie).
const DRIVER_VERSION: &str = "550.163.01";

/// A tenant rootfs whose library directory links to guest paths: the binds and
/// links land inside the rootfs, the guest's files are untouched.
fn planted_symlinks_stay_in_the_rootfs(guest: &Guest) {
    let evil_rootfs = fresh_rootfs(guest, "evil");
    let evil = guest.share.join("evil/rootfs");
    let evil_lib = evil.join("usr/lib/x86_64-linux-gnu");
    // The mount point of libcuda is an absolute link to the guest's driver list, the
    // soname link one to the guest's module list: followed naively, the bind would
    // cover guest files. The rootfs has the directories, so in-root resolution works.
    std::os::unix::fs::symlink(
        "/etc/gpuvm/nvidia/driver.json",
        evil_lib.join(format!("libcuda.so.{DRIVER_VERSION}")),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        "/etc/gpuvm/nvidia-modules.list",
        evil_lib.join("libnvidia-ml.so.1"),
    )
    .unwrap();
    std::fs::create_dir_all(evil.join("etc/gpuvm/nvidia")).unwrap();
    let (stdout, stderr, status) = run_request(
        guest,
        &probe_request(
            "evil",
            &evil_rootfs,
            "head -c 4 /etc/gpuvm/nvidia/driver.json | tail -c 3; echo",
            &[],
        ),
    );
    // The library was bound over the rootfs's own file the link named.
    assert_eq!((stdout.as_str(), status), ("ELF\n", 0), "{stderr}");
    // The guest's files, seen through a bind of the guest's /etc/gpuvm: unchanged.
    let mut req = probe_request(
        "guest-files",
        ROOTFS,
        "head -c 1 /guest/nvidia/driver.json; echo; head -c 4 /guest/nvidia-modules.list | grep -c ELF",
        &["NVIDIA_VISIBLE_DEVICES=void"],
    );
    req.mounts
        .push(oci_mount("/guest", "bind", "/etc/gpuvm", &["rbind", "ro"]));
    let (stdout, stderr, status) = run_request(guest, &req);
    assert_eq!(
        (stdout.as_str(), status),
        ("{\n0\n", 1),
        "the guest's files changed: {stderr}"
    );
}
