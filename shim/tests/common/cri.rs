//! The CRI side of the real-containerd tests (`cri.rs`, `cgroups.rs`): containerd with
//! its CRI plugin and the busybox image, a CRI v1 client (`k8s-cri`) on its socket,
//! and the pod and container configs kubelet would send.

use std::path::Path;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ExecSyncRequest, ExecSyncResponse,
    ImageSpec, ImageStatusRequest, LinuxContainerResources, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use super::{
    Containerd, IMAGE, Plugins, RUN_DIR, Setup, ShimSettings, busybox_image, processes_mentioning,
    run,
};

/// The CRI runtime handler naming the gpuvm runtime in containerd's config.
pub const RUNTIME_HANDLER: &str = "gpuvm";

/// A CRI client on containerd's socket.
pub type Client = RuntimeServiceClient<Channel>;

/// containerd with its CRI plugin, the busybox image imported into `k8s.io` (also the
/// pinned sandbox image) and listed by CRI, and a CRI client.
pub async fn start_cri(s: &Setup, dir: &Path, settings: &ShimSettings) -> (Containerd, Client) {
    let image = busybox_image(dir);
    let containerd = super::start_containerd(
        s,
        dir,
        settings,
        &Plugins::Cri {
            sandbox_image: IMAGE.to_owned(),
        },
    );
    run(containerd
        .ctr_in("k8s.io")
        .args(["images", "import"])
        .arg(&image));
    let channel = connect(containerd.socket.clone()).await;
    wait_for_cri_image(channel.clone(), IMAGE).await;
    (containerd, RuntimeServiceClient::new(channel))
}

/// A CRI test's world: containerd with CRI (default shim settings), a client, a
/// directory for pod logs. Fields drop in order: containerd (and what its shims left)
/// before the directory it lives in.
pub struct CriTest {
    pub containerd: Containerd,
    pub client: Client,
    /// Pods' `log_directory`.
    pub log_dir: std::path::PathBuf,
    pub setup: Setup,
    pub dir: tempfile::TempDir,
}

impl CriTest {
    /// Starts it, or `None` after printing SKIPPED (see [`super::setup_or_skip`]).
    pub async fn start_or_skip() -> Option<CriTest> {
        let setup = super::setup_or_skip()?;
        let dir = super::test_dir();
        let (containerd, client) = start_cri(&setup, dir.path(), &ShimSettings::new(&setup)).await;
        let log_dir = dir.path().join("pod-logs");
        std::fs::create_dir_all(&log_dir).expect("mkdir");
        Some(CriTest {
            containerd,
            client,
            log_dir,
            setup,
            dir,
        })
    }
}

/// A gRPC channel over containerd's unix socket.
pub async fn connect(socket: std::path::PathBuf) -> Channel {
    Endpoint::try_from("http://[::]")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect to containerd's CRI")
}

/// Waits until containerd's CRI image store lists `image`: it learns of an imported
/// image from an event, a moment after `ctr images import` returns, and until then a
/// RunPodSandbox tries to pull the sandbox image (and fails: no registry here).
pub async fn wait_for_cri_image(channel: Channel, image: &str) {
    let mut images = ImageServiceClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = images
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.to_owned(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await;
        if status.is_ok_and(|s| s.into_inner().image.is_some()) {
            return;
        }
        assert!(Instant::now() < deadline, "CRI never listed {image}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the kubelet passes for a Pod whose containers request and are limited to one
/// CPU and 512Mi (`calculateSandboxResources`; containerd copies it onto the sandbox's
/// spec as the `io.kubernetes.cri.sandbox-cpu-*` / `-memory` annotations).
pub fn one_cpu_512mi() -> LinuxContainerResources {
    LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 100_000,
        cpu_shares: 1024,
        memory_limit_in_bytes: 512 << 20,
        ..Default::default()
    }
}

/// A pod of 1 CPU and 512Mi (resources and `gpuvm.dev/*` annotations) on the "node"
/// network (containerd's private netns: no CNI), each container with its own pid
/// namespace.
pub fn sandbox_config(name: &str, log_dir: &Path) -> PodSandboxConfig {
    pod_config(
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

/// A pod `name` in namespace `default` with hostname `name`, logs in `log_dir`, one
/// CPU and 512Mi (resources and `gpuvm.dev/*` annotations) and `namespaces`.
pub fn pod_config(name: &str, log_dir: &Path, namespaces: NamespaceOption) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            namespace: "default".to_owned(),
            attempt: 0,
        }),
        hostname: name.to_owned(),
        log_directory: log_dir.display().to_string(),
        annotations: [
            ("gpuvm.dev/cpus".to_owned(), "1".to_owned()),
            ("gpuvm.dev/memory".to_owned(), "512Mi".to_owned()),
        ]
        .into(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces),
                ..Default::default()
            }),
            resources: Some(one_cpu_512mi()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A busybox container running `sleep 600`.
pub fn container_config(name: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.to_owned(),
            ..Default::default()
        }),
        command: vec!["/bin/sleep".to_owned()],
        args: vec!["600".to_owned()],
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// RunPodSandbox with the gpuvm handler; panics with `context()` on failure.
pub async fn run_pod(
    client: &mut Client,
    config: &PodSandboxConfig,
    context: impl Fn() -> String,
) -> String {
    match client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: RUNTIME_HANDLER.to_owned(),
        })
        .await
    {
        Ok(r) => r.into_inner().pod_sandbox_id,
        Err(e) => panic!("RunPodSandbox: {e}\n{}", context()),
    }
}

/// CreateContainer + StartContainer in `pod_id`; returns the container id.
pub async fn create_and_start(
    client: &mut Client,
    pod_id: &str,
    sandbox: &PodSandboxConfig,
    container: ContainerConfig,
    context: impl Fn() -> String,
) -> String {
    let name = container
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = match client
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.to_owned(),
            config: Some(container),
            sandbox_config: Some(sandbox.clone()),
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
    id
}

/// StopPodSandbox + RemovePodSandbox, as kubelet does.
pub async fn stop_and_remove_pod(client: &mut Client, pod_id: &str, context: impl Fn() -> String) {
    if let Err(e) = try_stop_and_remove_pod(client, pod_id).await {
        panic!("{e}\n{}", context());
    }
}

/// StopPodSandbox + RemovePodSandbox; the first error, naming its call.
pub async fn try_stop_and_remove_pod(client: &mut Client, pod_id: &str) -> Result<(), String> {
    client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod_id.to_owned(),
        })
        .await
        .map_err(|e| format!("StopPodSandbox: {e}"))?;
    client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.to_owned(),
        })
        .await
        .map_err(|e| format!("RemovePodSandbox: {e}"))?;
    Ok(())
}

/// A crash, as the cleanup tests make one: SIGKILLs the shim of `pod_id`, waits (60 s
/// at most) until containerd's cleanup (`shim delete`) removed the VM's work dir, then
/// stops and removes the pod as kubelet does after a runtime failure: again and again
/// (60 s at most) until CRI lets it go, since it learns of the containers' exits from
/// events a moment later. The caller then checks nothing is left behind.
pub async fn kill_shim_then_remove_pod(
    client: &mut Client,
    pod_id: &str,
    context: impl Fn() -> String,
) {
    let shim_pid = processes_mentioning(&format!("-id {pod_id} "))
        .into_iter()
        .find(|p| p.contains("containerd-shim-gpuvm-v1") && !p.trim_end().ends_with(" start"))
        .and_then(|p| p.split(':').next().and_then(|pid| pid.parse::<i32>().ok()))
        .expect("the shim's pid");
    // SAFETY: kill(2) of the shim's pid, just read from /proc; no memory effects here.
    assert_eq!(unsafe { libc::kill(shim_pid, libc::SIGKILL) }, 0);
    let work_dir = Path::new(RUN_DIR).join(pod_id);
    let deadline = Instant::now() + Duration::from_secs(60);
    while work_dir.exists() {
        assert!(
            Instant::now() < deadline,
            "containerd never cleaned up after the shim\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = try_stop_and_remove_pod(client, pod_id).await {
        assert!(
            Instant::now() < deadline,
            "the pod cannot go: {e}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// ExecSync of `cmd` in `container_id` (120 s timeout); panics if the call fails.
pub async fn exec_sync(client: &mut Client, container_id: &str, cmd: &[&str]) -> ExecSyncResponse {
    client
        .exec_sync(ExecSyncRequest {
            container_id: container_id.to_owned(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: 120,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {container_id}: {e}"))
        .into_inner()
}
