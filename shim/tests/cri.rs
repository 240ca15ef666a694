//! The CRI path, driven the way kubelet drives it: containerd 2.x with its CRI plugin
//! (a `gpuvm` runtime handler of type `io.containerd.gpuvm.v1`, the busybox image as
//! the pinned sandbox image in `k8s.io`), and a CRI v1 client from the `k8s-cri`
//! crate on containerd's socket: RunPodSandbox → CreateContainer → StartContainer →
//! ExecSync → StopPodSandbox → RemovePodSandbox. Six containers of one pod share one
//! VM, and their `securityContext` holds in the guest as under runc: containerd's
//! default capabilities (no mount), CAP_SYS_ADMIN added (mount works), `drop: [ALL]`
//! (no capabilities, no mount), `runAsUser: 1000`, a Localhost seccomp profile
//! (mkdir gets EPERM), RuntimeDefault seccomp, a pid namespace per container. While the pod runs, the shim's RSS and the sandbox
//! start breakdown are printed (`SHIM_RSS_KB=…`, `START_BREAKDOWN_MS …`), not asserted.
//!
//! Needs what `common` lists; prints `SKIPPED: <reason>` and passes when something is
//! missing. CRI uses containerd's full default container spec (the pod is on the
//! host network of containerd's private netns, so no CNI is needed).

mod common;

use std::time::{Duration, Instant};

use common::cri::{RUNTIME_HANDLER, connect, exec_sync, wait_for_cri_image};
use common::{Plugins, ShimSettings, busybox_image, run, start_containerd, test_dir};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    Capability, ContainerConfig, ContainerMetadata, CreateContainerRequest, ExecSyncResponse,
    ImageSpec, Int64Value, LinuxContainerConfig, LinuxContainerSecurityContext, NamespaceMode,
    NamespaceOption, PodSandboxConfig, RemovePodSandboxRequest, RunPodSandboxRequest,
    SecurityProfile, StartContainerRequest, StopPodSandboxRequest, security_profile::ProfileType,
};
use tonic::transport::Channel;

fn sandbox_config(name: &str, log_dir: &std::path::Path) -> PodSandboxConfig {
    // The pod is on the "node" network (containerd's private netns): no CNI.
    common::cri::pod_config(
        name,
        log_dir,
        NamespaceOption {
            network: NamespaceMode::Node.into(),
            pid: NamespaceMode::Container.into(),
            ipc: NamespaceMode::Pod.into(),
            ..Default::default()
        },
    )
}

fn container_config(name: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: common::IMAGE.to_owned(),
            ..Default::default()
        }),
        command: vec!["/bin/sleep".to_owned()],
        args: vec!["600".to_owned()],
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// `container_config(name)` with a container `securityContext`, the pod's namespace
/// options copied in as kubelet does.
fn secured_container_config(
    name: &str,
    sandbox: &PodSandboxConfig,
    security: LinuxContainerSecurityContext,
) -> ContainerConfig {
    let namespace_options = sandbox
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone());
    ContainerConfig {
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options,
                ..security
            }),
            ..Default::default()
        }),
        ..container_config(name)
    }
}

/// The `CapEff:` line of the exec's own /proc/self/status.
async fn effective_caps(client: &mut RuntimeServiceClient<Channel>, container_id: &str) -> String {
    let out = exec_sync(
        client,
        container_id,
        &["/bin/busybox", "grep", "CapEff", "/proc/self/status"],
    )
    .await;
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

/// Exit code of mounting a tmpfs inside the container (the guest's busybox `mount`).
async fn mount_tmpfs(client: &mut RuntimeServiceClient<Channel>, container_id: &str) -> i32 {
    let out = exec_sync(
        client,
        container_id,
        &["/bin/sh", "-c", "/bin/busybox mount -t tmpfs none /tmp"],
    )
    .await;
    println!(
        "mount in {container_id}: exit {} {}",
        out.exit_code,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out.exit_code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_lifecycle_through_cri_two_containers_share_one_vm() {
    let Some(s) = common::setup_or_skip() else {
        return;
    };
    let dir = test_dir();
    let image = busybox_image(dir.path());
    let containerd = start_containerd(
        &s,
        dir.path(),
        &ShimSettings::new(&s),
        &Plugins::Cri {
            sandbox_image: common::IMAGE.to_owned(),
        },
    );
    run(containerd
        .ctr_in("k8s.io")
        .args(["images", "import"])
        .arg(&image));
    let log_dir = dir.path().join("pod-logs");
    std::fs::create_dir_all(&log_dir).expect("mkdir");
    let channel = connect(containerd.socket.clone()).await;
    wait_for_cri_image(channel.clone(), common::IMAGE).await;
    let mut client = RuntimeServiceClient::new(channel);
    let context = || containerd.log_tail();

    let pod_name = format!("gpuvm-cri-{}", std::process::id());
    let config = sandbox_config(&pod_name, &log_dir);
    let started = Instant::now();
    let pod_id = match client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: RUNTIME_HANDLER.to_owned(),
        })
        .await
    {
        Ok(r) => r.into_inner().pod_sandbox_id,
        Err(e) => panic!("RunPodSandbox: {e}\n{}", context()),
    };
    let sandbox_ready = started.elapsed();
    let mut containers = Vec::new();
    // A Localhost seccomp profile (a file on the node) that denies mkdir.
    let profile = dir.path().join("no-mkdir.json");
    std::fs::write(
        &profile,
        serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
        })
        .to_string(),
    )
    .expect("write the seccomp profile");
    // first: containerd's default spec; second: adds CAP_SYS_ADMIN; nocaps: drops ALL;
    // user1000: runAsUser 1000; nomkdir: the profile above; runtimedefault:
    // containerd's default seccomp profile.
    let configs = [
        container_config("first"),
        secured_container_config(
            "second",
            &config,
            LinuxContainerSecurityContext {
                capabilities: Some(Capability {
                    add_capabilities: vec!["SYS_ADMIN".to_owned()],
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
        secured_container_config(
            "nocaps",
            &config,
            LinuxContainerSecurityContext {
                capabilities: Some(Capability {
                    drop_capabilities: vec!["ALL".to_owned()],
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
        secured_container_config(
            "user1000",
            &config,
            LinuxContainerSecurityContext {
                run_as_user: Some(Int64Value { value: 1000 }),
                ..Default::default()
            },
        ),
        secured_container_config(
            "nomkdir",
            &config,
            LinuxContainerSecurityContext {
                seccomp: Some(SecurityProfile {
                    profile_type: ProfileType::Localhost.into(),
                    localhost_ref: profile.display().to_string(),
                }),
                ..Default::default()
            },
        ),
        secured_container_config(
            "runtimedefault",
            &config,
            LinuxContainerSecurityContext {
                seccomp: Some(SecurityProfile {
                    profile_type: ProfileType::RuntimeDefault.into(),
                    localhost_ref: String::new(),
                }),
                ..Default::default()
            },
        ),
    ];
    for container in configs {
        let name = container
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = match client
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod_id.clone(),
                config: Some(container),
                sandbox_config: Some(config.clone()),
            })
            .await
        {
            Ok(r) => r.into_inner().container_id,
            Err(e) => panic!("CreateContainer {name}: {e}\n{}", context()),
        };
        if let Err(e) = client
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
        {
            panic!("StartContainer {name}: {e}\n{}", context());
        }
        containers.push(id);
    }
    println!(
        "CRI: sandbox ready in {sandbox_ready:?}, six containers running after {:?}",
        started.elapsed()
    );

    // ExecSync: stdout, stderr and the exit code come back.
    let out = exec_sync(
        &mut client,
        &containers[0],
        &[
            "/bin/sh",
            "-c",
            "echo out-via-cri; echo err-via-cri >&2; exit 7",
        ],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "out-via-cri",
        "{}",
        context()
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "err-via-cri");
    assert_eq!(out.exit_code, 7);

    // The containers' securityContext holds in the guest, as under runc: containerd's
    // default capability set (no CAP_SYS_ADMIN, so no mount), CAP_SYS_ADMIN added
    // (mount works), ALL dropped (no capabilities, no mount), runAsUser.
    assert_eq!(
        effective_caps(&mut client, &containers[0]).await,
        "00000000a80425fb",
        "containerd's default capabilities"
    );
    assert_ne!(mount_tmpfs(&mut client, &containers[0]).await, 0);
    assert_eq!(
        mount_tmpfs(&mut client, &containers[1]).await,
        0,
        "{}",
        context()
    );
    assert_eq!(
        effective_caps(&mut client, &containers[2]).await,
        "0000000000000000",
        "drop: [ALL]"
    );
    assert_ne!(mount_tmpfs(&mut client, &containers[2]).await, 0);
    let out = exec_sync(&mut client, &containers[3], &["/bin/busybox", "id", "-u"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1000");
    // Seccomp: the Localhost profile's mkdir gets EPERM, where the unfiltered
    // container's succeeds; containerd's RuntimeDefault profile loads and filters.
    let mkdir = ["/bin/busybox", "mkdir", "/tmp/made"];
    let out = exec_sync(&mut client, &containers[0], &mkdir).await;
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    let out = exec_sync(&mut client, &containers[4], &mkdir).await;
    assert_ne!(out.exit_code, 0);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (c, want) in [(0, "0"), (4, "2"), (5, "2")] {
        let out = exec_sync(
            &mut client,
            &containers[c],
            &["/bin/busybox", "grep", "^Seccomp:", "/proc/self/status"],
        )
        .await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            text.split_whitespace().nth(1),
            Some(want),
            "container {c}: {text}"
        );
    }

    // A container with the pod's pid mode Container has a pid namespace of its own
    // (its init is pid 1); one left at the CRI default (Pod) shares the pod's, the
    // guest's, where pid 1 is the agent.
    let init_comm = |out: ExecSyncResponse| String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let own = exec_sync(&mut client, &containers[1], &["/bin/cat", "/proc/1/comm"]).await;
    assert_eq!(init_comm(own), "sleep");
    let shared = exec_sync(&mut client, &containers[0], &["/bin/cat", "/proc/1/comm"]).await;
    assert_ne!(init_comm(shared), "sleep");

    // One VMM for the pod, and all containers in the same guest kernel.
    let work_dir = format!("{}/{pod_id}/", common::RUN_DIR);
    let vmms: Vec<String> = common::processes_mentioning(&work_dir)
        .into_iter()
        .filter(|p| p.contains("qemu-system"))
        .collect();
    assert_eq!(vmms.len(), 1, "one VMM for the pod: {vmms:?}");
    let boot_ids: Vec<String> = {
        let mut ids = Vec::new();
        for c in &containers {
            let out = exec_sync(
                &mut client,
                c,
                &["/bin/cat", "/proc/sys/kernel/random/boot_id"],
            )
            .await;
            assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
            ids.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        }
        ids
    };
    let host_boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_owned();
    assert!(!boot_ids[0].is_empty());
    for id in &boot_ids[1..] {
        assert_eq!(&boot_ids[0], id, "all containers share one guest");
    }
    assert_ne!(boot_ids[0], host_boot_id, "the containers run in a VM");

    // The guest has the size the Pod's resources allow (1 CPU, at most 512Mi).
    let out = exec_sync(
        &mut client,
        &containers[0],
        &[
            "/bin/sh",
            "-c",
            "grep -c ^processor /proc/cpuinfo; grep MemTotal /proc/meminfo",
        ],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("1"), "{text}");
    let mem_kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal: {text}"));
    assert!(
        (256 << 10..=512 << 10).contains(&mem_kib),
        "MemTotal {mem_kib} kB"
    );

    // Figures (printed, not asserted): the shim's memory per pod and where the
    // sandbox's start time went.
    let shim_pid = common::processes_mentioning(&format!("-id {pod_id} "))
        .into_iter()
        .find(|p| p.contains("containerd-shim-gpuvm-v1") && !p.trim_end().ends_with(" start"))
        .and_then(|p| p.split(':').next().and_then(|pid| pid.parse::<u32>().ok()));
    if let Some(rss) = shim_pid.and_then(common::rss_kib) {
        println!("SHIM_RSS_KB={rss}");
    }
    let state = containerd
        .bundle("k8s.io", &pod_id)
        .join(gpuvm_shim::persist::STATE_FILE);
    let record: Option<gpuvm_shim::persist::SandboxRecord> = std::fs::read(&state)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(t) = record.map(|r| r.timings) {
        println!(
            "START_BREAKDOWN_MS shim={} vmm={} boot={} agent={} container={}",
            t.shim_ms, t.vmm_ms, t.boot_ms, t.agent_ms, t.container_ms
        );
    }

    // Stop and remove the pod as kubelet does.
    if let Err(e) = client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
    {
        panic!("StopPodSandbox: {e}\n{}", context());
    }
    if let Err(e) = client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
    {
        panic!("RemovePodSandbox: {e}\n{}", context());
    }
    println!("CRI: whole pod lifecycle took {:?}", started.elapsed());

    // A Pod whose annotation asks for more CPUs than its resources account for is
    // refused before anything starts, with the shim's sentence.
    let mut greedy = sandbox_config(&format!("{pod_name}-greedy"), &log_dir);
    greedy
        .annotations
        .insert("gpuvm.dev/cpus".to_owned(), "2".to_owned());
    match client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(greedy),
            runtime_handler: RUNTIME_HANDLER.to_owned(),
        })
        .await
    {
        Ok(r) => panic!(
            "a greedy Pod was admitted: {}",
            r.into_inner().pod_sandbox_id
        ),
        Err(e) => assert!(
            e.message().contains(
                "asks for 2 CPUs, more than the 1 the Pod's CPU requests and limits account for"
            ),
            "{e}\n{}",
            context()
        ),
    }
    let mut ids: Vec<&str> = vec![&pod_id];
    ids.extend(containers.iter().map(String::as_str));
    // The teardown is asynchronous in places: give it a moment before checking.
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::task::block_in_place(|| containerd.assert_nothing_left_behind(&ids));
}
