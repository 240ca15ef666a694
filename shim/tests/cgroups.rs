//! Resource accounting through CRI, as kubelet drives it (containerd 2.x, its CRI
//! plugin, the real shim, QEMU): a pod with a `cgroup_parent` runs its VMM, virtiofsd
//! and vhost-device-vsock in the sandbox's cgroup (`/proc/<pid>/cgroup`, every
//! hierarchy), in both forms containerd writes (cgroupfs and systemd's
//! `slice:prefix:name`); a container's CPU and memory limits hold in the guest (its
//! cgroup's `cpu.max`, `cpu.weight`, `memory.max`, read through ExecSync in a container
//! that mounts the guest's cgroup2 tree), and a spec's rlimits too (`ctr run`: CRI
//! passes none); a container that allocates beyond its memory limit is OOM-killed and CRI
//! says `OOMKilled`; after a normal stop, and after a SIGKILLed shim and containerd's
//! cleanup, nothing is left: no process, mount, socket or cgroup.
//!
//! Prints `VM_OVERHEAD_KIB=…`: what the pod's cgroup holds beyond the guest RAM the
//! guest touched (the memfd's shmem) and the reclaimable page cache, i.e. the VMM's and
//! helpers' own memory; and the details behind it. Needs what `common` lists.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::cri::{
    Client, CriTest, container_config, create_and_start, exec_sync, kill_shim_then_remove_pod,
    run_pod, sandbox_config, stop_and_remove_pod,
};
use common::{ShimSettings, processes_mentioning, test_dir};
use gpuvm_shim::cgroup::{hierarchies, parse_proc_cgroup};
use k8s_cri::v1::{
    Capability, ContainerConfig, ContainerState, ContainerStatusRequest, LinuxContainerConfig,
    LinuxContainerResources, LinuxContainerSecurityContext, PodSandboxConfig,
};

/// The pids of the sandbox's VM processes (their command lines name its work dir),
/// by role.
fn vm_processes(pod_id: &str) -> Vec<(String, u32)> {
    let work_dir = format!("{}/{pod_id}/", common::RUN_DIR);
    processes_mentioning(&work_dir)
        .into_iter()
        .filter_map(|line| {
            let (pid, cmdline) = line.split_once(": ")?;
            let role = ["qemu-system", "virtiofsd", "vhost-device-vsock"]
                .into_iter()
                .find(|r| cmdline.split(' ').next().unwrap_or("").contains(r))?;
            Some((role.to_owned(), pid.parse().ok()?))
        })
        .collect()
}

/// Asserts every hierarchy of `/proc/<pid>/cgroup` puts the VM's processes (all three
/// roles) in `expected`.
fn assert_in_cgroup(pod_id: &str, expected: &str) {
    let processes = vm_processes(pod_id);
    for role in ["qemu-system", "virtiofsd", "vhost-device-vsock"] {
        assert!(
            processes.iter().any(|(r, _)| r == role),
            "no {role} for the pod: {processes:?}"
        );
    }
    for (role, pid) in &processes {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let lines = parse_proc_cgroup(&text);
        assert!(!lines.is_empty(), "{role} {pid}: no cgroups");
        for (controllers, path) in lines {
            assert_eq!(path, expected, "{role} {pid} in {controllers:?}:\n{text}");
        }
    }
}

/// The mounted hierarchies' mount points.
fn mount_points() -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    hierarchies(&mountinfo)
        .into_iter()
        .map(|h| h.mount_point)
        .collect()
}

/// Asserts `/<top>` exists in no hierarchy (the shim created it and removed it).
fn assert_cgroup_gone(top: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<PathBuf> = mount_points()
            .into_iter()
            .map(|m| m.join(top))
            .filter(|p| p.exists())
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "cgroups left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The two forms of cgroup parent kubelet passes, by cgroup driver.
#[derive(Debug, Clone, Copy)]
enum Driver {
    /// A path: `/<top>/podtest`.
    Cgroupfs,
    /// A slice: `gpuvmtest<pid>-pod.slice`, which containerd turns into the cgroups
    /// path `<slice>:cri-containerd:<id>`, and that into
    /// `/<top>/<slice>/cri-containerd-<id>.scope` in every hierarchy.
    Systemd,
}

/// A CRI test with one pod (`sandbox_config`) run under a cgroup parent of a
/// driver's form, below a top-level cgroup of this test's own.
struct CgroupPod {
    t: CriTest,
    config: PodSandboxConfig,
    pod_id: String,
    /// The top-level cgroup the shim creates (and must remove).
    top: String,
    /// The pod's `cgroup_parent`.
    parent: String,
}

impl CgroupPod {
    /// Starts containerd and runs the pod, or `None` after printing SKIPPED.
    async fn start_or_skip(driver: Driver) -> Option<CgroupPod> {
        let mut t = CriTest::start_or_skip().await?;
        let pid = std::process::id();
        let (name, top, parent) = match driver {
            Driver::Cgroupfs => (
                format!("cg-{pid}"),
                format!("gpuvm-cgtest-{pid}"),
                format!("/gpuvm-cgtest-{pid}/podtest"),
            ),
            Driver::Systemd => (
                format!("cgsd-{pid}"),
                format!("gpuvmtest{pid}.slice"),
                format!("gpuvmtest{pid}-pod.slice"),
            ),
        };
        let mut config = sandbox_config(&name, &t.log_dir);
        if let Some(linux) = config.linux.as_mut() {
            linux.cgroup_parent.clone_from(&parent);
        }
        let containerd = &t.containerd;
        let pod_id = run_pod(&mut t.client, &config, || containerd.log_tail()).await;
        Some(CgroupPod {
            t,
            config,
            pod_id,
            top,
            parent,
        })
    }
}

/// `container_config(name)` running `command` under `resources`.
fn limited(name: &str, command: &[&str], resources: LinuxContainerResources) -> ContainerConfig {
    ContainerConfig {
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        args: vec![],
        linux: Some(LinuxContainerConfig {
            resources: Some(resources),
            ..Default::default()
        }),
        ..container_config(name)
    }
}

/// A container that mounts the guest's cgroup2 tree at `/tmp/cg` (containerd gives
/// containers no cgroup mount in the guest) and sleeps: its execs read any container's
/// cgroup files there.
fn cgroup_reader() -> ContainerConfig {
    let script = "/bin/busybox mkdir -p /tmp/cg && /bin/busybox mount -t cgroup2 none /tmp/cg \
                  && exec /bin/sleep 600";
    ContainerConfig {
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        args: vec![],
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: Some(Capability {
                    add_capabilities: vec!["SYS_ADMIN".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..container_config("cgroup-reader")
    }
}

/// Waits until the reader's init has mounted the tree.
async fn wait_for_reader(client: &mut Client, reader: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let probe = ["/bin/cat", "/tmp/cg/cgroup.controllers"];
    while exec_sync(client, reader, &probe).await.exit_code != 0 {
        assert!(
            Instant::now() < deadline,
            "the reader never mounted cgroup2"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `file` of `container`'s cgroup in the guest, read by an exec in the reader.
async fn guest_cgroup_file(
    client: &mut Client,
    reader: &str,
    container: &str,
    file: &str,
) -> String {
    let path = format!("/tmp/cg/gpuvm/{container}/{file}");
    let out = exec_sync(client, reader, &["/bin/cat", &path]).await;
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Waits until CRI reports the container exited; returns (reason, exit code).
async fn wait_exited(
    client: &mut Client,
    container: &str,
    context: impl Fn() -> String,
) -> (String, i32) {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let status = client
            .container_status(ContainerStatusRequest {
                container_id: container.to_owned(),
                verbose: false,
            })
            .await
            .expect("ContainerStatus")
            .into_inner()
            .status
            .expect("a status");
        if status.state == ContainerState::ContainerExited as i32 {
            return (status.reason, status.exit_code);
        }
        assert!(
            Instant::now() < deadline,
            "{container} never exited\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A number from a `memory.stat`-style text.
fn stat(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// `RssAnon`/`RssFile`/`RssShmem` of a process, KiB.
fn rss_parts(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("RssAnon:"), field("RssFile:"), field("RssShmem:"))
}

/// Prints what the pod's cgroup holds beside the guest's RAM (`VM_OVERHEAD_KIB`):
/// memory charged to it minus the guest RAM the guest touched (shmem: QEMU's memfd)
/// minus reclaimable page cache (the kernel image, the image's files). From the
/// unified hierarchy's `memory.current` where it has the memory controller, else the
/// v1 memory hierarchy's `memory.usage_in_bytes`.
fn print_overhead(cgroup: &str, pod_id: &str) {
    let mut figures = None;
    // cgroup v2's names, then v1's: the usage, the page cache, anon, and whether a
    // hierarchy that has them wins over the others.
    let names = [
        ("memory.current", "file", "anon", true),
        ("memory.usage_in_bytes", "cache", "rss", false),
    ];
    'mounts: for mount in mount_points() {
        let dir = mount.join(cgroup.trim_start_matches('/'));
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        let stat_text = read("memory.stat").unwrap_or_default();
        for (usage_file, cache, anon, wins) in names {
            if let Some(usage) = read(usage_file) {
                let shmem = stat(&stat_text, "shmem");
                figures = Some((
                    usage.trim().parse::<u64>().unwrap_or(0),
                    shmem,
                    stat(&stat_text, cache).saturating_sub(shmem),
                    stat(&stat_text, anon),
                ));
                if wins {
                    break 'mounts;
                }
            }
        }
    }
    let Some((usage, shmem, cache, anon)) = figures else {
        println!("VM_OVERHEAD_KIB: no memory controller holds the pod's cgroup {cgroup}");
        return;
    };
    let overhead = usage.saturating_sub(shmem).saturating_sub(cache);
    println!("VM_OVERHEAD_KIB={}", overhead / 1024);
    println!(
        "VM_CGROUP_MEMORY_KIB usage={} guest_ram_touched_shmem={} page_cache={} anon={}",
        usage / 1024,
        shmem / 1024,
        cache / 1024,
        anon / 1024
    );
    for (role, pid) in vm_processes(pod_id) {
        let (anon, file, shmem) = rss_parts(pid);
        println!("VM_PROCESS_RSS_KIB {role} pid={pid} anon={anon} file={file} shmem={shmem}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vm_is_charged_to_the_pod_and_containers_get_their_limits() {
    let Some(mut p) = CgroupPod::start_or_skip(Driver::Cgroupfs).await else {
        return;
    };
    let (containerd, client) = (&p.t.containerd, &mut p.t.client);
    let (config, pod_id) = (&p.config, p.pod_id.as_str());
    let context = || containerd.log_tail();
    let cgroup = format!("{}/{pod_id}", p.parent);
    assert_in_cgroup(pod_id, &cgroup);

    // A container limited to 64Mi, half a CPU (quota 50ms per 100ms) and 512 shares.
    let resources = LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 50_000,
        cpu_shares: 512,
        memory_limit_in_bytes: 64 << 20,
        ..Default::default()
    };
    let sleeper = limited("limited", &["/bin/sleep", "600"], resources);
    let limited_id = create_and_start(client, pod_id, config, sleeper, context).await;
    let reader = create_and_start(client, pod_id, config, cgroup_reader(), context).await;
    wait_for_reader(client, &reader).await;
    // An exec joins its container's cgroup, whose files carry the spec's limits.
    let out = exec_sync(client, &limited_id, &["/bin/cat", "/proc/self/cgroup"]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("0::/gpuvm/{limited_id}")
    );
    // runc's (≥ 1.3) and crun's conversion of 512 shares is weight 59.
    let memory = (64u64 << 20).to_string();
    for (file, want) in [
        ("memory.max", memory.as_str()),
        ("cpu.max", "50000 100000"),
        ("cpu.weight", "59"),
    ] {
        assert_eq!(
            guest_cgroup_file(client, &reader, &limited_id, file).await,
            want,
            "{file}"
        );
    }
    // Beyond its 32Mi limit: the guest kernel kills `tail`, CRI says OOMKilled.
    let hog = limited(
        "hog",
        &[
            "/bin/sh",
            "-c",
            "head -c 104857600 /dev/zero | /bin/busybox tail",
        ],
        LinuxContainerResources {
            memory_limit_in_bytes: 32 << 20,
            ..Default::default()
        },
    );
    let started = Instant::now();
    let hog_id = create_and_start(client, pod_id, config, hog, context).await;
    let (reason, code) = wait_exited(client, &hog_id, context).await;
    println!("OOM case took {:.2?}", started.elapsed());
    assert_eq!((reason.as_str(), code), ("OOMKilled", 137), "{}", context());
    // The limited container and the VM lived through it.
    let out = exec_sync(client, &limited_id, &["/bin/true"]).await;
    assert_eq!(out.exit_code, 0);

    print_overhead(&cgroup, pod_id);

    // SIGKILL the shim: containerd's cleanup (`shim delete`) kills the VM and removes
    // the cgroups the shim created, then the pod stops and goes as usual.
    kill_shim_then_remove_pod(client, pod_id, context).await;
    assert!(vm_processes(pod_id).is_empty(), "the VM outlived its shim");
    let ids = [pod_id, &limited_id, &reader, &hog_id];
    tokio::task::block_in_place(|| {
        containerd.assert_nothing_left_behind(&ids);
        assert_cgroup_gone(&p.top);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_systemd_cgroup_parent_holds_the_vm_and_goes_with_the_pod() {
    let Some(mut p) = CgroupPod::start_or_skip(Driver::Systemd).await else {
        return;
    };
    let (containerd, client) = (&p.t.containerd, &mut p.t.client);
    let (config, pod_id, slice) = (&p.config, p.pod_id.as_str(), &p.parent);
    let context = || containerd.log_tail();
    let spec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(containerd.bundle("k8s.io", pod_id).join("config.json")).expect("spec"),
    )
    .expect("json");
    assert_eq!(
        spec["linux"]["cgroupsPath"],
        format!("{slice}:cri-containerd:{pod_id}")
    );
    assert_in_cgroup(
        pod_id,
        &format!("/{}/{slice}/cri-containerd-{pod_id}.scope", p.top),
    );
    let id = create_and_start(client, pod_id, config, container_config("c"), context).await;
    let out = exec_sync(client, &id, &["/bin/true"]).await;
    assert_eq!(out.exit_code, 0);
    stop_and_remove_pod(client, pod_id, context).await;
    tokio::task::block_in_place(|| {
        containerd.assert_nothing_left_behind(&[pod_id, &id]);
        assert_cgroup_gone(&p.top);
    });
}

/// `ctr run` with a spec of its own: its `process.rlimits` hold in the guest (CRI
/// passes none unless containerd's `base_runtime_spec` sets them); a `cgroupsPath`
/// with `..` is refused with the shim's sentence.
#[test]
fn a_specs_rlimits_hold_in_the_guest() {
    let Some(s) = common::setup_or_skip() else {
        return;
    };
    let dir = test_dir();
    common::busybox_image(dir.path());
    let id = format!("gpuvm-cgtest-{}-rlimits", std::process::id());
    let containerd = common::start_containerd(
        &s,
        dir.path(),
        &ShimSettings::new(&s),
        &common::Plugins::CtrOnly,
    );
    let path = common::spec_with_args(dir.path(), &["/bin/sh", "-c", "ulimit -Sn; ulimit -Hn"]);
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("spec")).expect("json");
    spec["process"]["rlimits"] =
        serde_json::json!([{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 654}]);
    std::fs::write(&path, spec.to_string()).expect("write spec");
    // `ctr run` of container `id` with the spec at `path`, as it is then.
    let ctr_run = |id: &str| {
        containerd
            .ctr()
            .args(["run", "--rm", "--runtime", "io.containerd.gpuvm.v1"])
            .arg("--runtime-config-path")
            .arg(&containerd.shim_config)
            .arg("--config")
            .arg(&path)
            .arg(id)
            .output()
            .expect("ctr run")
    };
    let out = ctr_run(&id);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        containerd.log_tail()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "321\n654\n");

    // A cgroupsPath that climbs out of the hierarchy is refused before anything runs.
    let hostile = format!("{id}-hostile");
    spec["linux"]["cgroupsPath"] = serde_json::json!("/kubepods/../../etc");
    std::fs::write(&path, spec.to_string()).expect("write spec");
    let out = ctr_run(&hostile);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(r#"linux.cgroupsPath "/kubepods/../../etc" has the component "..""#),
        "{stderr}"
    );
    let _ = containerd
        .ctr()
        .args(["container", "delete", &hostile])
        .output();
    containerd.assert_nothing_left_behind(&[&id, &hostile]);
    assert_cgroup_gone("etc");
}
