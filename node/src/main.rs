//! `gpuvm-node`: the gpuvm node agent. Scans the host's NVIDIA GPUs, binds them to
//! `vfio-pci`, and publishes the node's `GpuNode` and labels, every `--interval`
//! seconds or at once on SIGHUP, until SIGTERM.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{ArgAction, Parser, ValueEnum};
use gpuvm_api::GpuDevice;
use gpuvm_node::{
    AgentConfig, DEFAULT_GPU_CHECK_DIR, DEFAULT_HEALTH_DIR, Publisher, inventory_to_status,
    labels_for, observe, planned_actions, render_table, report_gpu_checks,
};
use kube::runtime::events::{Recorder, Reporter};
use tokio::signal::unix::{SignalKind, signal};

/// gpuvm node agent: discovers NVIDIA GPUs from sysfs, binds them to vfio-pci, and
/// publishes the node's GpuNode inventory and gpuvm Node labels.
#[derive(Debug, Parser)]
#[command(name = "gpuvm-node", version)]
struct Args {
    /// Name of the Kubernetes Node this agent runs on (the GpuNode gets the same name).
    /// Required unless --dry-run; in a DaemonSet pass it from the downward API
    /// (spec.nodeName).
    #[arg(long, env = "NODE_NAME", required_unless_present = "dry_run")]
    node_name: Option<String>,

    /// Root of the sysfs mount to scan and bind through.
    #[arg(long, default_value = "/sys")]
    sysfs_root: PathBuf,

    /// Root of the device tree holding vfio/<group>.
    #[arg(long, default_value = "/dev")]
    dev_root: PathBuf,

    /// Directory where the shim records reset failures, one file per PCI address
    /// (see the node README for the format).
    #[arg(long, default_value = DEFAULT_HEALTH_DIR)]
    health_dir: PathBuf,

    /// Directory where the shim records each GPU pod's in-guest GPU check, one file per
    /// Pod (`<namespace>_<name>`); the agent mirrors them into the Pods' gpuvm.dev/gpu-check
    /// annotation (see the node README).
    #[arg(long, default_value = DEFAULT_GPU_CHECK_DIR)]
    gpu_check_dir: PathBuf,

    /// Bind passthrough-capable GPUs (and their companion functions) to vfio-pci.
    /// On by default.
    #[arg(long, overrides_with = "no_bind", action = ArgAction::SetTrue)]
    bind: bool,

    /// Do not bind anything: GPUs not already on vfio-pci are reported unhealthy.
    #[arg(long, overrides_with = "bind", action = ArgAction::SetTrue)]
    no_bind: bool,

    /// Seconds between rescans (SIGHUP rescans at once).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    interval: u64,

    /// Run one pass and exit (non-zero when publishing failed).
    #[arg(long)]
    once: bool,

    /// Print what a pass would do (bindings, the GpuNode, the labels) as a table,
    /// touching nothing: no sysfs writes, no API calls.
    #[arg(long)]
    dry_run: bool,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Args {
    fn binding(&self) -> bool {
        !self.no_bind
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    let config = AgentConfig {
        sysfs_root: args.sysfs_root.clone(),
        dev_root: args.dev_root.clone(),
        health_dir: args.health_dir.clone(),
        bind: args.binding(),
    };
    let publisher = if args.dry_run {
        None
    } else {
        let Some(node_name) = args.node_name.clone() else {
            bail!("--node-name (or NODE_NAME) is required unless --dry-run");
        };
        let client = kube::Client::try_default()
            .await
            .context("could not build a Kubernetes client (in-cluster or KUBECONFIG)")?;
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "gpuvm-node".to_owned(),
                instance: Some(node_name.clone()),
            },
        );
        Some((Publisher::new(client.clone(), node_name), client, recorder))
    };
    let mut hangup = signal(SignalKind::hangup()).context("could not watch SIGHUP")?;
    let mut terminate = signal(SignalKind::terminate()).context("could not watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("could not watch SIGINT")?;
    tracing::info!(
        node = args.node_name.as_deref().unwrap_or("-"),
        sysfs = %args.sysfs_root.display(),
        bind = config.bind,
        dry_run = args.dry_run,
        "gpuvm-node starting"
    );

    let mut agent = Agent {
        args: &args,
        config,
        publisher,
        last: Vec::new(),
    };
    loop {
        let outcome = tokio::select! {
            outcome = agent.pass() => outcome,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        };
        if args.once {
            return outcome;
        }
        if let Err(err) = outcome {
            tracing::warn!(
                error = format!("{err:#}"),
                "pass failed; retrying at the next interval"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(args.interval)) => {}
            _ = hangup.recv() => tracing::info!("SIGHUP: rescanning now"),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("gpuvm-node stopping");
    Ok(())
}

/// The loop's state between passes.
struct Agent<'a> {
    args: &'a Args,
    config: AgentConfig,
    /// The publisher, the client and the Event recorder; `None` in a dry run.
    publisher: Option<(Publisher, kube::Client, Recorder)>,
    /// The devices of the last pass: what a dry run compares with, and what a pass
    /// falls back on when the API cannot be read.
    last: Vec<GpuDevice>,
}

impl Agent<'_> {
    /// Scan → bind → check → publish → label.
    async fn pass(&mut self) -> anyhow::Result<()> {
        let previous = match &self.publisher {
            Some((publisher, _, _)) => match publisher.published_devices().await {
                Ok(devices) => devices,
                Err(err) => {
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::from(err)),
                        "using the last pass's devices"
                    );
                    self.last.clone()
                }
            },
            None => self.last.clone(),
        };
        let config = self.config.clone();
        let apply = !self.args.dry_run;
        let pass = tokio::task::spawn_blocking(move || observe(&config, previous, apply))
            .await
            .context("the sysfs scan panicked")?;
        let status = inventory_to_status(&pass.inventory, &pass.observations);
        log_health_changes(&self.last, &status.devices);
        self.last = status.devices.clone();

        let Some((publisher, client, recorder)) = &self.publisher else {
            let actions = planned_actions(
                &pass.inventory,
                self.config.bind,
                self.args.node_name.as_deref(),
                &status,
            );
            println!(
                "gpuvm-node dry run: {} under {} (nothing written)",
                self.args
                    .node_name
                    .as_deref()
                    .map_or_else(|| "no node name".to_owned(), |n| format!("node {n}")),
                self.config.sysfs_root.display()
            );
            print!("{}", render_table(&status, &actions));
            return Ok(());
        };
        // The shim's GPU check records reach their Pods even when publishing fails.
        if let Err(err) = report_gpu_checks(client, recorder, &self.args.gpu_check_dir).await {
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(err)),
                "could not report GPU checks; retrying at the next pass"
            );
        }
        publisher.publish(&status).await?;
        let labels: BTreeMap<String, String> = labels_for(&status);
        publisher.label_node(&labels).await?;
        tracing::debug!(
            gpus = status.gpu_count,
            healthy = status.healthy_count,
            "published GpuNode"
        );
        Ok(())
    }
}

/// `info` only for state changes: a GPU appearing, or its health changing.
fn log_health_changes(before: &[GpuDevice], after: &[GpuDevice]) {
    let before: BTreeMap<&str, &GpuDevice> =
        before.iter().map(|d| (d.pci_address.as_str(), d)).collect();
    for device in after {
        let was = before.get(device.pci_address.as_str());
        if was.is_some_and(|w| w.healthy == device.healthy && w.reason == device.reason) {
            continue;
        }
        if device.healthy {
            tracing::info!(gpu = %device.pci_address, model = %device.model, "GPU healthy");
        } else {
            tracing::warn!(
                gpu = %device.pci_address,
                model = %device.model,
                reason = device.reason.as_deref().unwrap_or(""),
                "GPU unhealthy"
            );
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
