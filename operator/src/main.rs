//! `gpuvm-operator`: places GpuMachines on GPU nodes and runs each in its own micro-VM Pod.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use gpuvm_operator::controller::{self, Settings};
use gpuvm_operator::leader::{self, LeaseConfig};
use gpuvm_operator::metrics::{self, Metrics};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// jemalloc, not glibc's malloc: the operator's heap is many small objects (its caches)
/// among short-lived request buffers, and glibc's heap kept the freed buffers resident
/// (9.2 KB per machine against 5.7 KB, measured with `e2e/tests/scale.rs`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its start (`_RJEM_MALLOC_CONF` in the environment
/// still overrides them). Two arenas, not four per CPU: the operator is a handful of
/// tasks whose small objects fragment more arenas for no gain. Freed pages go back to the
/// system within a second, by a background thread, instead of ten: the memory a bulk
/// apply's buffers took is returned soon after. At 10,000 machines this took the
/// settled RSS from 97.8 MB to 92.5 MB and the peak from 118 MB to 104 MB
/// (`e2e/tests/scale.rs`, release build).
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: JemallocConf =
    JemallocConf(c"narenas:2,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// The C `const char *` jemalloc reads its options from.
#[cfg(feature = "jemalloc")]
#[repr(transparent)]
struct JemallocConf(*const std::ffi::c_char);

// SAFETY: it points at a constant string that nothing ever writes.
#[cfg(feature = "jemalloc")]
unsafe impl Sync for JemallocConf {}

/// Log output format.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The gpuvm operator: places GpuMachines on GPU nodes, picks the exact GPUs, and runs
/// each machine as a Pod whose RuntimeClass boots a micro-VM.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "GPUVM_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "GPUVM_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter, in `RUST_LOG` syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
    /// Elect a leader through a Lease, so several replicas can run.
    #[arg(long, env = "GPUVM_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader Lease (defaults to the Pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "gpuvm-system")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "gpuvm-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (defaults to the Pod name, else the hostname).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a Lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// Seconds after which a GpuNode without a heartbeat counts as not ready.
    #[arg(long, default_value_t = 120)]
    heartbeat_timeout_seconds: u64,
    /// Seconds a node may be NotReady (or its GpuNode heartbeat stale beyond the
    /// heartbeat timeout) before its machines are placed on other nodes.
    #[arg(long, env = "GPUVM_NODE_LOST_GRACE_SECONDS", default_value_t = 300)]
    node_lost_grace_seconds: u64,
    /// Seconds before the first restart of a failed machine; doubles per restart in a
    /// row, like kubelet's CrashLoopBackOff.
    #[arg(long, default_value_t = 10)]
    restart_backoff_base_seconds: u64,
    /// The longest wait between restarts.
    #[arg(long, default_value_t = 300)]
    restart_backoff_max_seconds: u64,
    /// How many machines are reconciled at once (0: no limit).
    #[arg(long, env = "GPUVM_CONCURRENCY", default_value_t = controller::DEFAULT_CONCURRENCY)]
    concurrency: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_new(&args.log_level).context("invalid --log-level")?;
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => subscriber.json().init(),
        LogFormat::Text => subscriber.init(),
    }

    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration found (in-cluster or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::new());
    let server = tokio::spawn(metrics::serve(args.metrics_addr, metrics.clone()));
    info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /readyz");

    let heartbeat_timeout = Duration::from_secs(args.heartbeat_timeout_seconds);
    let settings = Settings {
        heartbeat_timeout,
        node_loss: gpuvm_operator::node_loss::Policy {
            grace: Duration::from_secs(args.node_lost_grace_seconds),
            heartbeat_timeout,
        },
        restart_backoff: gpuvm_operator::status::Backoff {
            base: Duration::from_secs(args.restart_backoff_base_seconds),
            cap: Duration::from_secs(
                args.restart_backoff_max_seconds
                    .max(args.restart_backoff_base_seconds),
            ),
            ..Default::default()
        },
        concurrency: args.concurrency,
        ..Settings::default()
    };
    if !args.leader_elect {
        metrics.leader.set(1);
        controller::run(client, metrics, settings).await;
        server.abort();
        return Ok(());
    }

    let identity = args
        .identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("gpuvm-operator-{}", std::process::id()));
    let lease = LeaseConfig {
        namespace: args.lease_namespace,
        name: args.lease_name,
        identity,
        duration: Duration::from_secs(args.lease_seconds.max(3)),
    };
    // A follower is ready (it can take over at once); it just doesn't reconcile.
    metrics.set_ready(true);
    let leadership = leader::acquire(&client, &lease).await;
    metrics.set_ready(false);
    metrics.leader.set(1);
    let lost = tokio::select! {
        () = controller::run(client.clone(), metrics.clone(), settings) => false,
        () = leadership.lost() => true,
    };
    if lost {
        error!("lost leadership; exiting so a new leader can take over");
        std::process::exit(1);
    }
    info!("controller stopped; releasing the lease");
    leadership.release().await;
    server.abort();
    Ok(())
}
