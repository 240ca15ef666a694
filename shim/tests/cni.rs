//! The pod network with a real CNI, driven as kubelet drives it: containerd 2.x (in a
//! network namespace of its own, `unshare --net`) with its CRI plugin and Debian's
//! `containernetworking-plugins` (bridge + host-local IPAM + loopback) in `<dir>/cni`.
//! RunPodSandbox on the pod network: the shim carries the CNI's veth into the VM (a tap
//! and tc redirects in the pod's netns), the agent gives the guest NIC the pod's
//! address, routes and hostname; busybox `httpd` in a container of the VM answers an
//! HTTP GET from containerd's namespace (the "host" side of the bridge) at the pod IP
//! that PodSandboxStatus reports. Then the shim is killed (SIGKILL): containerd's
//! `shim delete` must leave no tap and no tc qdisc or filter in the pod's namespace,
//! and the pod is stopped and removed with nothing left behind.
//!
//! Needs what `common` lists plus the CNI plugins (`scripts/cni-deps.sh`,
//! `GPUVM_CNI_DIR`, default `/opt/gpuvm-cni/usr/lib/cni`); prints
//! `SKIPPED: <reason>` and passes when something is missing (fails under
//! `GPUVM_REQUIRE=cni`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cri::{RUNTIME_HANDLER, exec_sync, start_cri};
use common::{Containerd, ShimSettings, test_dir};
use gpuvm_testkit::Requirement;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxStatusRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::Channel;

/// The pod subnet of the test's bridge network, and its gateway (the bridge).
const SUBNET: &str = "10.88.77.0/24";
const GATEWAY: &str = "10.88.77.1";
/// Where busybox httpd listens in the guest.
const HTTP_PORT: u16 = 8080;

/// The CNI plugins' directory, or why there is none.
fn cni_plugins() -> Result<PathBuf, String> {
    let dir = std::env::var_os("GPUVM_CNI_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/gpuvm-cni/usr/lib/cni"));
    for plugin in ["bridge", "host-local", "loopback"] {
        if !dir.join(plugin).exists() {
            return Err(format!(
                "no CNI plugin {plugin} in {} (run scripts/cni-deps.sh or set GPUVM_CNI_DIR)",
                dir.display()
            ));
        }
    }
    Ok(dir)
}

/// Links the plugins into `<dir>/cni` (containerd's CNI bin and conf dir) and writes
/// the bridge network's conflist there, its IPAM state under `<dir>/ipam`.
fn write_cni(dir: &Path, plugins: &Path) {
    let cni = dir.join("cni");
    std::fs::create_dir_all(&cni).expect("mkdir cni");
    for plugin in ["bridge", "host-local", "loopback"] {
        std::os::unix::fs::symlink(plugins.join(plugin), cni.join(plugin)).expect("symlink");
    }
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "gpuvm-test",
        "plugins": [{
            "type": "bridge",
            "bridge": "gpuvmbr0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": dir.join("ipam").display().to_string()
            }
        }]
    });
    std::fs::write(cni.join("10-gpuvm.conflist"), conflist.to_string()).expect("conflist");
}

fn sandbox_config(name: &str, log_dir: &Path) -> PodSandboxConfig {
    // The pod network: containerd makes a netns and calls the CNI.
    common::cri::pod_config(
        name,
        log_dir,
        NamespaceOption {
            network: NamespaceMode::Pod.into(),
            pid: NamespaceMode::Pod.into(),
            ipc: NamespaceMode::Pod.into(),
            ..Default::default()
        },
    )
}

/// A container serving `/tmp/www` (an index naming the guest's hostname) with
/// busybox httpd.
fn http_server() -> ContainerConfig {
    let script = format!(
        "/bin/busybox mkdir -p /tmp/www && \
         echo \"hello from $(/bin/busybox hostname)\" > /tmp/www/index.html && \
         exec /bin/busybox httpd -f -p {HTTP_PORT} -h /tmp/www"
    );
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "web".to_owned(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: common::IMAGE.to_owned(),
            ..Default::default()
        }),
        command: vec!["/bin/sh".to_owned(), "-c".to_owned(), script],
        log_path: "web.log".to_owned(),
        ..Default::default()
    }
}

/// The pod's netns path, from the sandbox task's OCI spec in its bundle.
fn pod_netns(containerd: &Containerd, pod_id: &str) -> PathBuf {
    let config = containerd.bundle("k8s.io", pod_id).join("config.json");
    let spec: oci_spec::runtime::Spec = serde_json::from_slice(
        &std::fs::read(&config).unwrap_or_else(|e| panic!("{}: {e}", config.display())),
    )
    .expect("the sandbox's OCI spec");
    gpuvm_shim::network::netns_path(&spec).expect("the pod sandbox has a network namespace")
}

/// One `GET /` over HTTP/1.0 to `ip:HTTP_PORT` from the network namespace `netns`
/// (a thread enters it); the response's body.
fn http_get_in(netns: &Path, ip: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let namespace = std::fs::File::open(netns)?;
    let address: std::net::SocketAddr = format!("{ip}:{HTTP_PORT}")
        .parse()
        .map_err(std::io::Error::other)?;
    let request = format!("GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n");
    std::thread::spawn(move || {
        nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(request.as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        match response.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
                Ok(body.to_owned())
            }
            _ => Err(std::io::Error::other(format!("bad response {response:?}"))),
        }
    })
    .join()
    .map_err(|_| std::io::Error::other("the HTTP client thread panicked"))?
}

/// GETs the pod's page from containerd's network namespace (the bridge's side),
/// retrying for up to 60 s; the body.
fn fetch_from_the_host(containerd: &Containerd, ip: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let netns = PathBuf::from(format!("/proc/{}/ns/net", containerd.pid()));
    loop {
        match http_get_in(&netns, ip) {
            Ok(body) => return body,
            Err(e) => assert!(
                Instant::now() < deadline,
                "GET http://{ip}:{HTTP_PORT}/ from the host failed: {e}\n{}",
                containerd.log_tail()
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The pid of the shim serving sandbox `pod_id`.
fn shim_pid(pod_id: &str) -> i32 {
    common::processes_mentioning(&format!("-id {pod_id} "))
        .into_iter()
        .find(|p| p.contains("containerd-shim-gpuvm-v1") && !p.trim_end().ends_with(" start"))
        .and_then(|p| p.split(':').next().and_then(|pid| pid.parse().ok()))
        .expect("the pod's shim runs")
}

/// RunPodSandbox → the web container created and started; the pod and container ids.
async fn run_web_pod(
    client: &mut RuntimeServiceClient<Channel>,
    config: &PodSandboxConfig,
    containerd: &Containerd,
) -> (String, String) {
    let pod_id = match client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: RUNTIME_HANDLER.to_owned(),
        })
        .await
    {
        Ok(r) => r.into_inner().pod_sandbox_id,
        Err(e) => panic!("RunPodSandbox: {e}\n{}", containerd.log_tail()),
    };
    let web = match client
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(http_server()),
            sandbox_config: Some(config.clone()),
        })
        .await
    {
        Ok(r) => r.into_inner().container_id,
        Err(e) => panic!("CreateContainer: {e}\n{}", containerd.log_tail()),
    };
    if let Err(e) = client
        .start_container(StartContainerRequest {
            container_id: web.clone(),
        })
        .await
    {
        panic!("StartContainer: {e}\n{}", containerd.log_tail());
    }
    (pod_id, web)
}

/// Waits (up to 60 s) until the watched pod netns holds no tap and no ingress qdisc.
fn wait_network_detached(containerd: &Containerd) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = containerd.netns_leftovers();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left in the pod's netns after the killed shim's cleanup: {left:?}\n{}",
            containerd.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_pod_serves_http_on_its_cni_pod_ip_and_a_killed_shim_leaves_no_tap() {
    let Some(s) = common::setup_or_skip() else {
        return;
    };
    let plugins = match cni_plugins() {
        Ok(p) => p,
        Err(reason) => {
            gpuvm_testkit::skip(Requirement::Cni, &reason);
            return;
        }
    };
    let dir = test_dir();
    write_cni(dir.path(), &plugins);
    let (containerd, mut client) = start_cri(&s, dir.path(), &ShimSettings::new(&s)).await;
    let log_dir = dir.path().join("pod-logs");
    std::fs::create_dir_all(&log_dir).expect("mkdir");

    let pod_name = format!("gpuvm-cni-{}", std::process::id());
    let config = sandbox_config(&pod_name, &log_dir);
    let started = Instant::now();
    let (pod_id, web) = run_web_pod(&mut client, &config, &containerd).await;
    let status = client
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.clone(),
            verbose: false,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner();
    let ip = status
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(
        ip.starts_with("10.88.77."),
        "pod IP {ip:?} is not from {SUBNET}"
    );
    let netns = pod_netns(&containerd, &pod_id);
    containerd.watch_netns(&netns);

    // The pod's namespace holds the tap and the two ingress qdiscs of the redirect.
    let mut attached = containerd.netns_leftovers();
    attached.sort();
    assert_eq!(
        attached,
        vec![
            format!("ingress qdisc on eth0 in {}", netns.display()),
            format!("ingress qdisc on tap0_gpuvm in {}", netns.display()),
            format!("tap tap0_gpuvm in {}", netns.display()),
        ]
    );

    // The guest has the pod's address on eth0, its default route and hostname.
    let out = exec_sync(
        &mut client,
        &web,
        &[
            "/bin/sh",
            "-c",
            "/bin/busybox ip -4 addr show eth0; /bin/busybox ip route; /bin/busybox hostname",
        ],
    )
    .await;
    let guest = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(guest.contains(&format!("inet {ip}/24")), "{guest}");
    assert!(
        guest.contains(&format!("default via {GATEWAY} dev eth0")),
        "{guest}"
    );
    assert!(guest.trim_end().ends_with(&pod_name), "{guest}");

    // The server in the VM answers the host at the pod IP.
    let body = tokio::task::block_in_place(|| fetch_from_the_host(&containerd, &ip));
    assert_eq!(body.trim(), format!("hello from {pod_name}"));
    println!(
        "CNI: pod {ip} answered HTTP from the host {:?} after RunPodSandbox",
        started.elapsed()
    );

    // SIGKILL the shim while the VM runs (the web container stopped first: CRI keeps a
    // container of a killed shared shim "running"): containerd's `shim delete` must
    // remove the tap and the tc redirects from the pod's (still existing) namespace.
    if let Err(e) = client
        .stop_container(StopContainerRequest {
            container_id: web.clone(),
            timeout: 5,
        })
        .await
    {
        panic!("StopContainer: {e}\n{}", containerd.log_tail());
    }
    assert_eq!(containerd.netns_leftovers().len(), 3, "the VM still runs");
    let pid = shim_pid(&pod_id);
    // SAFETY: kill(2) on the pid of the shim this test started; no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    tokio::task::block_in_place(|| wait_network_detached(&containerd));

    // containerd notices the dead shim's tasks as exited a moment later.
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
    {
        println!("StopPodSandbox after the killed shim: {e}");
        assert!(
            Instant::now() < deadline,
            "StopPodSandbox: {e}\n{}",
            containerd.log_tail()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if let Err(e) = client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
    {
        panic!("RemovePodSandbox: {e}\n{}", containerd.log_tail());
    }
    tokio::task::block_in_place(|| containerd.assert_nothing_left_behind(&[&pod_id, &web]));
}
