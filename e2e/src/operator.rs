//! The real `gpuvm-operator` binary, run as a child process against the test's API
//! server and killed (SIGKILL) when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tempfile::TempDir;

use crate::net::{free_port, http_get};
use crate::process::ChildProcess;

/// How to run one operator replica.
#[derive(Clone, Debug)]
pub struct OperatorOptions {
    /// `--leader-elect`.
    pub leader_elect: bool,
    /// `--lease-namespace` (must exist when `leader_elect`).
    pub lease_namespace: String,
    /// `--identity` in the Lease.
    pub identity: String,
    /// `--lease-seconds`.
    pub lease_seconds: u64,
    /// `--heartbeat-timeout-seconds` (long by default: the fixtures' heartbeats are
    /// refreshed by the test, and a slow CI box must not turn nodes stale halfway through).
    pub heartbeat_timeout_seconds: u64,
    /// `--node-lost-grace-seconds`, when not the operator's default.
    pub node_lost_grace_seconds: Option<u64>,
}

impl OperatorOptions {
    /// A single replica without leader election.
    pub fn single(namespace: &str) -> Self {
        OperatorOptions {
            leader_elect: false,
            lease_namespace: namespace.to_owned(),
            identity: "e2e-operator".to_owned(),
            lease_seconds: 15,
            heartbeat_timeout_seconds: 3600,
            node_lost_grace_seconds: None,
        }
    }

    /// A leader-electing replica with a short Lease, so a fail-over fits in a test.
    pub fn elected(namespace: &str, identity: &str) -> Self {
        OperatorOptions {
            leader_elect: true,
            lease_namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            lease_seconds: 6,
            heartbeat_timeout_seconds: 3600,
            node_lost_grace_seconds: None,
        }
    }

    /// The command-line arguments.
    pub fn args(&self, metrics: SocketAddr) -> Vec<String> {
        let mut args = vec![
            format!("--leader-elect={}", self.leader_elect),
            "--lease-namespace".to_owned(),
            self.lease_namespace.clone(),
            "--identity".to_owned(),
            self.identity.clone(),
            "--lease-seconds".to_owned(),
            self.lease_seconds.to_string(),
            "--metrics-addr".to_owned(),
            metrics.to_string(),
            "--heartbeat-timeout-seconds".to_owned(),
            self.heartbeat_timeout_seconds.to_string(),
            "--log-level".to_owned(),
            "info,gpuvm_operator=debug".to_owned(),
        ];
        if let Some(grace) = self.node_lost_grace_seconds {
            args.push("--node-lost-grace-seconds".to_owned());
            args.push(grace.to_string());
        }
        args
    }
}

/// A running operator.
#[derive(Debug)]
pub struct Operator {
    process: ChildProcess,
    metrics: SocketAddr,
    options: OperatorOptions,
    _logs: Option<TempDir>,
}

impl Operator {
    /// Starts the operator with `KUBECONFIG=kubeconfig` and waits until its `/readyz`
    /// answers 200 (caches synced; a leader-election follower is ready at once). Logs go
    /// to `log_dir` when given (kept with the control plane), else to a temp dir.
    pub async fn start(
        kubeconfig: &Path,
        options: OperatorOptions,
        log_dir: Option<&Path>,
    ) -> anyhow::Result<Operator> {
        let binary = operator_binary().await?;
        let metrics: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let (logs, dir) = match log_dir {
            Some(d) => (None, d.to_path_buf()),
            None => {
                let t = tempfile::tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let log = dir.join(format!(
            "operator-{}-{}.log",
            options.identity,
            metrics.port()
        ));
        let mut command = Command::new(&binary);
        command
            .args(options.args(metrics))
            .env("KUBECONFIG", kubeconfig)
            // Nothing from the outer environment may steer it elsewhere.
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("GPUVM_METRICS_ADDR")
            .env_remove("GPUVM_LEADER_ELECT")
            .env_remove("GPUVM_LOG_FORMAT")
            .env_remove("RUST_LOG")
            .env_remove("KUBERNETES_SERVICE_HOST");
        let process = ChildProcess::spawn(
            &format!("gpuvm-operator {}", options.identity),
            &mut command,
            &log,
        )?;
        let mut op = Operator {
            process,
            metrics,
            options,
            _logs: logs,
        };
        op.wait_ready(Duration::from_secs(60)).await?;
        Ok(op)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            if self.process.exited().is_some() {
                bail!("the operator stopped: {}", self.process.describe());
            }
            match http_get(self.metrics, "/readyz").await {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => last = format!("{code} {body}"),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "the operator was not ready within {} s ({last}): {}",
            timeout.as_secs(),
            self.process.describe()
        )
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        match http_get(self.metrics, "/metrics").await? {
            (200, body) => Ok(body),
            (code, body) => bail!("/metrics answered {code}: {body}"),
        }
    }

    /// The identity it runs under.
    pub fn identity(&self) -> &str {
        &self.options.identity
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.exited().is_none()
    }

    /// Kills it with SIGKILL, as a node failure or an OOM kill would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Its memory, read from `/proc/<pid>/status`.
    pub fn memory(&self) -> Option<Memory> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.process.pid()?)).ok()?;
        Memory::parse(&status)
    }

    /// The CPU seconds it has used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.process.cpu_seconds()
    }

    /// Its state and the tail of its log.
    pub fn describe(&mut self) -> String {
        self.process.describe()
    }
}

/// A process's memory in KiB, as `/proc/<pid>/status` gives it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Resident now (`VmRSS`): `anon` + `file` + shared memory.
    pub rss: u64,
    /// The largest resident size so far (`VmHWM`).
    pub hwm: u64,
    /// Resident anonymous memory (`RssAnon`): the heap, stacks and the allocator's
    /// retained pages; what grows with the number of machines.
    pub anon: u64,
    /// Resident file-backed memory (`RssFile`): mostly the binary's own pages, larger
    /// for a debug build.
    pub file: u64,
}

impl Memory {
    /// Reads the fields from the text of `/proc/<pid>/status`; `None` when one is missing.
    pub fn parse(status: &str) -> Option<Memory> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        };
        Some(Memory {
            rss: field("VmRSS:")?,
            hwm: field("VmHWM:")?,
            anon: field("RssAnon:")?,
            file: field("RssFile:")?,
        })
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VmRSS {} KiB (RssAnon {} KiB, RssFile {} KiB), VmHWM {} KiB",
            self.rss, self.anon, self.file, self.hwm
        )
    }
}

static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The `gpuvm-operator` binary: `GPUVM_OPERATOR_BIN` if set, else built (or found fresh)
/// with `cargo build -p gpuvm-operator` in this test's profile, once per test binary.
pub async fn operator_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("GPUVM_OPERATOR_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("GPUVM_OPERATOR_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let found = tokio::task::spawn_blocking(|| {
        BINARY
            .get_or_init(|| build_operator().map_err(|e| format!("{e:#}")))
            .clone()
    })
    .await
    .context("the build task panicked")?;
    found.map_err(anyhow::Error::msg)
}

/// The profile directory of this test binary (`target/debug` for
/// `target/debug/deps/operator-<hash>`).
fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir.file_name()? == "deps" {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

fn build_operator() -> anyhow::Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the e2e crate has no parent directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let release = profile_dir().is_some_and(|d| d.file_name().is_some_and(|n| n == "release"));
    let mut command = Command::new(&cargo);
    command.current_dir(workspace).args([
        "build",
        "-p",
        "gpuvm-operator",
        "--bin",
        "gpuvm-operator",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        command.arg("--release");
    }
    let started = Instant::now();
    let out = command
        .output()
        .with_context(|| format!("running {} build", cargo.to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "cargo build -p gpuvm-operator failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let built = executable_from_messages(&String::from_utf8_lossy(&out.stdout), "gpuvm-operator");
    let bin = built
        .or_else(|| profile_dir().map(|d| d.join("gpuvm-operator")))
        .filter(|p| p.is_file())
        .context("cargo built gpuvm-operator but reported no executable")?;
    crate::note(&format!(
        "e2e: operator binary {} (cargo build took {:.1} s)",
        bin.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(bin)
}

/// The `executable` of the `compiler-artifact` message for binary `name` in cargo's
/// JSON output.
pub fn executable_from_messages(stdout: &str, name: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_executable_in_cargo_messages() {
        let out = r#"{"reason":"compiler-artifact","target":{"name":"gpuvm_operator","kind":["lib"]},"executable":null}
{"reason":"compiler-artifact","target":{"name":"gpuvm-operator","kind":["bin"]},"executable":"/t/debug/gpuvm-operator","fresh":true}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_from_messages(out, "gpuvm-operator"),
            Some(PathBuf::from("/t/debug/gpuvm-operator"))
        );
        assert_eq!(executable_from_messages(out, "crdgen"), None);
    }

    #[test]
    fn arguments_match_the_operator_flags() {
        let addr: SocketAddr = "127.0.0.1:9555".parse().unwrap();
        let args = OperatorOptions::elected("ns1", "op-a").args(addr).join(" ");
        assert!(args.contains("--leader-elect=true"), "{args}");
        assert!(args.contains("--lease-namespace ns1"), "{args}");
        assert!(args.contains("--identity op-a"), "{args}");
        assert!(args.contains("--metrics-addr 127.0.0.1:9555"), "{args}");
        assert!(args.contains("--heartbeat-timeout-seconds 3600"), "{args}");
        let single = OperatorOptions::single("ns1").args(addr).join(" ");
        assert!(single.contains("--leader-elect=false"), "{single}");
    }

    #[test]
    fn memory_is_read_from_proc_status() {
        let status = "Name:\tx\nVmHWM:\t  900 kB\nVmRSS:\t  800 kB\nRssAnon:\t  500 kB\nRssFile:\t  300 kB\n";
        let m = Memory::parse(status).unwrap();
        assert_eq!((m.rss, m.hwm, m.anon, m.file), (800, 900, 500, 300));
        assert_eq!(Memory::parse("VmRSS:\t1 kB\n"), None);
    }

    #[test]
    fn profile_dir_is_the_target_profile() {
        let dir = profile_dir().unwrap();
        assert!(dir.join("deps").is_dir(), "{}", dir.display());
    }
}

#[cfg(test)]
mod build_tests {
    /// Builds the operator from inside `cargo test`, as the e2e tests do. Ignored by
    /// default: it may compile the operator. Run with `cargo test -p gpuvm-e2e --lib --
    /// --ignored`.
    #[tokio::test]
    #[ignore = "builds gpuvm-operator"]
    async fn the_operator_binary_is_built_and_runs() {
        let bin = super::operator_binary().await.unwrap();
        let out = std::process::Command::new(&bin)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        for flag in [
            "--leader-elect",
            "--lease-namespace",
            "--metrics-addr",
            "--heartbeat-timeout-seconds",
            "--identity",
            "--lease-seconds",
        ] {
            assert!(help.contains(flag), "{flag} missing from:\n{help}");
        }
    }
}
