//! The CRI v1 client side shared by the CRI tests (`cri.rs`, `cni.rs`): the
//! connection to containerd's socket, the wait for an imported image, ExecSync.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ExecSyncRequest, ExecSyncResponse, ImageSpec, ImageStatusRequest, LinuxContainerResources,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// The CRI runtime handler naming the gpuvm runtime in containerd's config.
pub const RUNTIME_HANDLER: &str = "gpuvm";

/// A CRI channel over containerd's unix socket.
pub async fn connect(socket: PathBuf) -> Channel {
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

/// ExecSync of `cmd` in `container_id` (120 s timeout); panics when the call fails.
pub async fn exec_sync(
    client: &mut RuntimeServiceClient<Channel>,
    container_id: &str,
    cmd: &[&str],
) -> ExecSyncResponse {
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

/// A pod `name` in namespace `default` with hostname `name`, logs in `log_dir`, one
/// CPU and 512Mi (resources and `gpuvm.dev/*` annotations) and `namespaces`.
pub fn pod_config(
    name: &str,
    log_dir: &std::path::Path,
    namespaces: NamespaceOption,
) -> PodSandboxConfig {
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
