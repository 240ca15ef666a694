//! A Kubernetes API server for the tests: an existing cluster, or etcd + kube-apiserver
//! (+ kube-controller-manager) started on loopback from binaries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tempfile::TempDir;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::assets::{self, Assets, ServerSource};
use crate::net::{free_ports, http_get};
use crate::process::ChildProcess;
use crate::{kubeconfig, note, pki};
use gpuvm_testkit::{Requirement, skip};

/// Tests take turns: the operator watches the whole cluster, so two tests' operators
/// would fight over each other's machines. A tokio mutex is not tied to a runtime, so
/// it works across the per-test runtimes of `#[tokio::test]`, and a panicking test
/// releases it (no poisoning).
static SERIAL: LazyLock<Arc<Mutex<()>>> = LazyLock::new(|| Arc::new(Mutex::new(())));

/// How long the apiserver may take to answer `/readyz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running API server and a client for it. Dropping it kills every process it started
/// (by PID) and removes its temp dir.
pub struct ControlPlane {
    client: Client,
    kubeconfig: PathBuf,
    external: bool,
    controller_manager: Option<ChildProcess>,
    apiserver: Option<ChildProcess>,
    etcd: Option<ChildProcess>,
    // Declared after the processes so it is removed after they are killed.
    dir: Option<TempDir>,
    _turn: OwnedMutexGuard<()>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("kubeconfig", &self.kubeconfig)
            .field("external", &self.external)
            .field("controller_manager", &self.controller_manager.is_some())
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Connects to or starts an API server as the environment says; `None` (after
    /// printing `SKIPPED: <reason>`) when there is none. Panics, with the processes' logs,
    /// when binaries were given but the control plane does not come up.
    pub async fn start_or_skip() -> Option<ControlPlane> {
        match Self::try_start().await {
            Ok(cp) => cp,
            Err(e) => panic!("the control plane did not start: {e:#}"),
        }
    }

    /// Like [`ControlPlane::start_or_skip`], with the error returned.
    pub async fn try_start() -> anyhow::Result<Option<ControlPlane>> {
        Self::try_start_for(None).await
    }

    /// Like [`ControlPlane::try_start`]; the `SKIPPED:` line names `test` when given.
    pub async fn try_start_for(test: Option<&str>) -> anyhow::Result<Option<ControlPlane>> {
        match assets::discover_from_env()? {
            ServerSource::Unavailable(reason) => {
                // Fails instead when GPUVM_REQUIRE names `apiserver`.
                match test {
                    Some(test) => skip(Requirement::ApiServer, &format!("{test}: {reason}")),
                    None => skip(Requirement::ApiServer, &reason),
                }
                Ok(None)
            }
            ServerSource::Kubeconfig(path) => {
                let turn = SERIAL.clone().lock_owned().await;
                Self::connect(path, turn).await.map(Some)
            }
            ServerSource::Binaries(assets) => {
                let turn = SERIAL.clone().lock_owned().await;
                Self::launch(&assets, turn).await.map(Some)
            }
        }
    }

    async fn connect(path: PathBuf, turn: OwnedMutexGuard<()>) -> anyhow::Result<ControlPlane> {
        let client = client_for(&path).await?;
        let version = client
            .apiserver_version()
            .await
            .with_context(|| format!("reaching the cluster of {}", path.display()))?;
        note(&format!(
            "e2e: using the cluster of {} (Kubernetes {})",
            path.display(),
            version.git_version
        ));
        Ok(ControlPlane {
            client,
            kubeconfig: path,
            external: true,
            controller_manager: None,
            apiserver: None,
            etcd: None,
            dir: None,
            _turn: turn,
        })
    }

    async fn launch(assets: &Assets, turn: OwnedMutexGuard<()>) -> anyhow::Result<ControlPlane> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("gpuvm-e2e-")
            .tempdir()
            .context("creating the control plane's temp dir")?;
        let root = dir.path().to_path_buf();
        let pki_dir = root.join("pki");
        std::fs::create_dir(&pki_dir)?;
        let pki = pki::generate(&pki_dir)?;
        let [etcd_client, etcd_peer, secure, kcm_port] = free_ports(4)?[..] else {
            bail!("could not allocate ports");
        };

        let mut etcd = ChildProcess::spawn(
            "etcd",
            Command::new(&assets.etcd).args(etcd_args(
                &assets.etcd,
                &root.join("etcd-data"),
                etcd_client,
                etcd_peer,
            )),
            &root.join("etcd.log"),
        )?;
        wait_for_etcd(&mut etcd, etcd_client).await?;

        let mut apiserver = ChildProcess::spawn(
            "kube-apiserver",
            Command::new(&assets.kube_apiserver).args(apiserver_args(
                &pki,
                &root.join("apiserver-certs"),
                etcd_client,
                secure,
            )),
            &root.join("kube-apiserver.log"),
        )?;
        let kubeconfig_path = root.join("kubeconfig");
        std::fs::write(
            &kubeconfig_path,
            kubeconfig::render(
                &format!("https://127.0.0.1:{secure}"),
                &pki.ca_cert,
                &pki.client_cert,
                &pki.client_key,
            ),
        )
        .context("writing the kubeconfig")?;
        let client = client_for(&kubeconfig_path).await?;
        wait_for_readyz(&client, &mut apiserver, &mut etcd).await?;

        let controller_manager = match &assets.kube_controller_manager {
            Some(bin) => Some(ChildProcess::spawn(
                "kube-controller-manager",
                Command::new(bin).args(controller_manager_args(
                    &kubeconfig_path,
                    &root.join("kcm-certs"),
                    kcm_port,
                )),
                &root.join("kube-controller-manager.log"),
            )?),
            None => None,
        };
        note(&format!(
            "e2e: loopback control plane up in {:.1} s at https://127.0.0.1:{secure} ({}; logs in {})",
            started.elapsed().as_secs_f64(),
            if controller_manager.is_some() {
                "with kube-controller-manager"
            } else {
                "no kube-controller-manager: no garbage collection"
            },
            root.display()
        ));
        Ok(ControlPlane {
            client,
            kubeconfig: kubeconfig_path,
            external: false,
            controller_manager,
            apiserver: Some(apiserver),
            etcd: Some(etcd),
            dir: Some(dir),
            _turn: turn,
        })
    }

    /// A client for the API server (admin rights).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The kubeconfig file for child processes (the operator).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Whether this is an existing cluster (from `KUBECONFIG`), not one started here.
    pub fn is_external(&self) -> bool {
        self.external
    }

    /// Whether a garbage collector runs: an existing cluster is assumed to have one; a
    /// loopback control plane has one only with kube-controller-manager.
    pub fn has_garbage_collector(&self) -> bool {
        self.external || self.controller_manager.is_some()
    }

    /// For a test that needs garbage collection or namespace deletion: `true` when
    /// [`ControlPlane::has_garbage_collector`]; otherwise prints `SKIPPED: <test>: ...`
    /// and returns `false`, or fails when `GPUVM_REQUIRE` names `controller-manager`.
    /// A kube-controller-manager that was started but has already exited is an error
    /// (with its log), not a skip.
    pub fn garbage_collector_or_skip(&mut self, test: &str) -> anyhow::Result<bool> {
        if let Some(kcm) = &mut self.controller_manager
            && kcm.exited().is_some()
        {
            bail!(
                "{test}: kube-controller-manager stopped: {}",
                kcm.describe()
            );
        }
        if self.has_garbage_collector() {
            return Ok(true);
        }
        skip(
            Requirement::ControllerManager,
            &format!(
                "{test}: garbage collection needs kube-controller-manager \
                 (set KUBE_CONTROLLER_MANAGER or put it in KUBEBUILDER_ASSETS)"
            ),
        );
        Ok(false)
    }

    /// A temp dir that lives as long as the control plane (for operator logs), or `None`
    /// for an existing cluster.
    pub fn work_dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(TempDir::path)
    }

    /// The CPU seconds used so far by each process it started (`etcd`, `kube-apiserver`).
    pub fn cpu_seconds(&self) -> Vec<(&'static str, f64)> {
        [("etcd", &self.etcd), ("kube-apiserver", &self.apiserver)]
            .into_iter()
            .filter_map(|(name, p)| Some((name, p.as_ref()?.cpu_seconds()?)))
            .collect()
    }

    /// The tails of the control plane's logs, for a failing test's message.
    pub fn describe(&mut self) -> String {
        [
            &mut self.etcd,
            &mut self.apiserver,
            &mut self.controller_manager,
        ]
        .into_iter()
        .flatten()
        .map(ChildProcess::describe)
        .collect::<Vec<_>>()
        .join("\n")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Dependents first; the temp dir goes after, with the fields.
        for p in [
            &mut self.controller_manager,
            &mut self.apiserver,
            &mut self.etcd,
        ]
        .into_iter()
        .flatten()
        {
            p.kill();
        }
        if std::env::var_os("GPUVM_E2E_KEEP").is_some()
            && let Some(dir) = self.dir.take()
        {
            note(&format!("e2e: kept {}", dir.keep().display()));
        }
    }
}

/// A client from one kubeconfig file (not the merged `KUBECONFIG` list).
pub async fn client_for(path: &Path) -> anyhow::Result<Client> {
    let kubeconfig =
        Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading {}", path.display()))?;
    Client::try_from(config).context("building the Kubernetes client")
}

/// etcd's flags: loopback only, a fresh data dir, no fsync where the binary knows the
/// flag (etcd 3.5+; Debian bookworm ships 3.4 without it).
pub fn etcd_args(etcd: &Path, data_dir: &Path, client: u16, peer: u16) -> Vec<String> {
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut args = vec![
        "--name=default".to_owned(),
        format!("--data-dir={}", data_dir.display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=default={peer_url}"),
        "--initial-cluster-state=new".to_owned(),
    ];
    if etcd_knows(etcd, "--unsafe-no-fsync") {
        args.push("--unsafe-no-fsync".to_owned());
    }
    args
}

/// Whether `etcd --help` lists `flag`.
fn etcd_knows(etcd: &Path, flag: &str) -> bool {
    Command::new(etcd)
        .arg("--help")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).contains(flag)
                || String::from_utf8_lossy(&o.stderr).contains(flag)
        })
        .unwrap_or(false)
}

/// kube-apiserver's flags, as seen working with v1.34 on loopback.
pub fn apiserver_args(
    pki: &pki::Pki,
    cert_dir: &Path,
    etcd_client: u16,
    secure: u16,
) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    vec![
        format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
        "--bind-address=127.0.0.1".to_owned(),
        "--advertise-address=127.0.0.1".to_owned(),
        format!("--secure-port={secure}"),
        format!("--cert-dir={}", path(cert_dir)),
        format!("--tls-cert-file={}", path(&pki.server_cert)),
        format!("--tls-private-key-file={}", path(&pki.server_key)),
        format!("--client-ca-file={}", path(&pki.ca_cert)),
        format!("--token-auth-file={}", path(&pki.tokens)),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
        format!("--service-account-key-file={}", path(&pki.sa_pub)),
        format!("--service-account-signing-key-file={}", path(&pki.sa_key)),
        "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
        "--authorization-mode=RBAC".to_owned(),
        "--endpoint-reconciler-type=none".to_owned(),
        // As kubeadm and every real cluster that runs node agents: the default (false)
        // rejects the chart's privileged node DaemonSets ("disallowed by cluster policy").
        "--allow-privileged=true".to_owned(),
    ]
}

/// kube-controller-manager's flags: only the controllers a control plane without
/// kubelets needs (garbage collection of owned Pods, namespace deletion, the `default`
/// ServiceAccount). The node-lifecycle controller stays off, so fake Nodes stay Ready.
pub fn controller_manager_args(kubeconfig: &Path, cert_dir: &Path, port: u16) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--controllers=garbagecollector,namespace,serviceaccount".to_owned(),
        "--leader-elect=false".to_owned(),
        "--bind-address=127.0.0.1".to_owned(),
        format!("--secure-port={port}"),
        format!("--cert-dir={}", cert_dir.display()),
        "--use-service-account-credentials=false".to_owned(),
    ]
}

async fn wait_for_etcd(etcd: &mut ChildProcess, port: u16) -> anyhow::Result<()> {
    let addr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if etcd.exited().is_some() {
            bail!("etcd stopped before it was healthy: {}", etcd.describe());
        }
        match http_get(addr, "/health").await {
            Ok((200, body)) if body.contains("true") => return Ok(()),
            Ok((code, body)) => last = format!("{code} {body}"),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "etcd was not healthy after 30 s ({last}): {}",
        etcd.describe()
    )
}

async fn wait_for_readyz(
    client: &Client,
    apiserver: &mut ChildProcess,
    etcd: &mut ChildProcess,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if apiserver.exited().is_some() || etcd.exited().is_some() {
            bail!(
                "the control plane stopped before the apiserver was ready: {}\n{}",
                apiserver.describe(),
                etcd.describe()
            );
        }
        let request = http::Request::get("/readyz").body(Vec::new())?;
        match tokio::time::timeout(Duration::from_secs(5), client.request_text(request)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "/readyz timed out".to_owned(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "kube-apiserver's /readyz did not answer 200 within {} s (last: {last}): {}\n{}",
        READY_TIMEOUT.as_secs(),
        apiserver.describe(),
        etcd.describe()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apiserver_flags_carry_the_loopback_essentials() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki::Pki {
            ca_cert: dir.path().join("ca.crt"),
            ca_key: dir.path().join("ca.key"),
            server_cert: dir.path().join("server.crt"),
            server_key: dir.path().join("server.key"),
            client_cert: dir.path().join("client.crt"),
            client_key: dir.path().join("client.key"),
            sa_key: dir.path().join("sa.key"),
            sa_pub: dir.path().join("sa.pub"),
            tokens: dir.path().join("tokens.csv"),
            admin_token: "t".into(),
        };
        let args = apiserver_args(&pki, dir.path(), 2379, 6443).join(" ");
        for want in [
            "--etcd-servers=http://127.0.0.1:2379",
            "--bind-address=127.0.0.1",
            "--secure-port=6443",
            "--authorization-mode=RBAC",
            "--endpoint-reconciler-type=none",
            "--service-account-signing-key-file=",
            "--service-account-key-file=",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--client-ca-file=",
            "--token-auth-file=",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
        ] {
            assert!(args.contains(want), "{want} missing from {args}");
        }
    }

    #[tokio::test]
    async fn etcd_starts_on_loopback_and_dies_with_its_guard() {
        // The same places the harness looks (KUBEBUILDER_ASSETS included), then PATH.
        let from_assets = match assets::discover_from_env() {
            Ok(ServerSource::Binaries(a)) => Some(a.etcd),
            _ => None,
        };
        let Some(bin) = from_assets
            .or_else(|| std::env::var_os("ETCD").map(PathBuf::from))
            .or_else(|| assets::find_on_path("etcd"))
        else {
            skip(
                Requirement::ApiServer,
                "no etcd binary (set ETCD or KUBEBUILDER_ASSETS, or install etcd-server)",
            );
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let [client, peer] = free_ports(2).unwrap()[..] else {
            unreachable!()
        };
        let mut etcd = ChildProcess::spawn(
            "etcd",
            Command::new(&bin).args(etcd_args(&bin, &dir.path().join("data"), client, peer)),
            &dir.path().join("etcd.log"),
        )
        .unwrap();
        wait_for_etcd(&mut etcd, client).await.unwrap();
        let pid = etcd.pid().unwrap();
        drop(etcd);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", client)).is_err(),
            "etcd still listens after its guard was dropped"
        );
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;

    /// The kubeconfig, the certificates and kube's rustls client fit together: a TLS
    /// server (`openssl s_server`) that requires a client certificate signed by the CA
    /// answers the client's request.
    #[tokio::test]
    async fn kube_client_trusts_the_serving_cert_and_presents_the_client_cert() {
        if assets::find_on_path("openssl").is_none() {
            // The loopback control plane's certificates are made with openssl.
            skip(Requirement::ApiServer, "openssl is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pki = pki::generate(dir.path()).unwrap();
        let port = crate::net::free_port().unwrap();
        let mut server = ChildProcess::spawn(
            "openssl s_server",
            Command::new("openssl").args([
                "s_server",
                "-accept",
                &format!("127.0.0.1:{port}"),
                "-cert",
                pki.server_cert.to_str().unwrap(),
                "-key",
                pki.server_key.to_str().unwrap(),
                "-CAfile",
                pki.ca_cert.to_str().unwrap(),
                "-Verify",
                "1",
                "-verify_return_error",
                "-www",
            ]),
            &dir.path().join("s_server.log"),
        )
        .unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig::render(
                &format!("https://127.0.0.1:{port}"),
                &pki.ca_cert,
                &pki.client_cert,
                &pki.client_key,
            ),
        )
        .unwrap();
        let client = client_for(&kubeconfig).await.unwrap();
        let mut last = String::new();
        for _ in 0..100 {
            let request = http::Request::get("/readyz").body(Vec::new()).unwrap();
            match client.request_text(request).await {
                Ok(body) => {
                    // s_server -www reports the session, including our client cert.
                    assert!(
                        body.contains("gpuvm-e2e-admin") || body.contains("Cipher"),
                        "{body}"
                    );
                    return;
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no TLS exchange: {last}\n{}", server.describe());
    }
}
