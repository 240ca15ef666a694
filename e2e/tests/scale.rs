//! Operator memory at scale against a real kube-apiserver: 10,000 GpuMachines over 1,250
//! eight-GPU GpuNodes, all placed with their Pods, and the operator's resident memory
//! (goal: ≤ 100 MB).
//!
//! Not part of the default run (it takes many minutes on a small box): run it with
//! `cargo test -p gpuvm-e2e --test scale -- --ignored --nocapture`.
//! `GPUVM_E2E_SCALE_MACHINES` (default 10000) sets the size; nodes are machines / 8.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use anyhow::{bail, ensure};
use gpuvm_api::GpuMachine;
use gpuvm_e2e::{HostKind, OperatorOptions, TestEnv, note};
use kube::ResourceExt as _;
use kube::api::ListParams;

/// The goal for the operator's resident memory, in KiB (100 MB).
const RSS_GOAL_KIB: u64 = 100_000_000 / 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a scale benchmark that takes many minutes; run it with --ignored"]
async fn operator_memory_at_ten_thousand_machines() -> anyhow::Result<()> {
    let Some(mut env) = TestEnv::start("scale").await? else {
        return Ok(());
    };
    let machines_count: usize = std::env::var("GPUVM_E2E_SCALE_MACHINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let nodes = machines_count.div_ceil(8);
    let started = Instant::now();
    env.add_hosts(HostKind::HgxH100, nodes).await?;
    // No node lifecycle controller runs here and the operator's heartbeat timeout is an
    // hour: the keeper's 2 writes per node per 10 s would only slow the run down.
    env.stop_keeper();
    note(&format!(
        "SCALE: {nodes} GpuNodes added in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let mut op = env
        .start_operator(OperatorOptions::single(&env.namespace))
        .await?;
    let machines: Vec<GpuMachine> = (0..machines_count)
        .map(|i| env.machine(&format!("s{i:05}"), "h100-80gb", 1))
        .collect();

    let result = async {
        let started = Instant::now();
        apply_with_retries(&env, &machines).await?;
        note(&format!(
            "SCALE: {machines_count} machines applied in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        // A generous bound: about 4 machines/s on a loaded 2-core box.
        let deadline = started + Duration::from_secs(300 + u64::try_from(machines_count / 4)?);
        let pods = env.pods();
        let mut peak_rss = 0;
        loop {
            // A list of one item and the server's count of the rest: cheap at any size.
            // No label selector: the server leaves remainingItemCount unset for filtered
            // lists, and the test's namespace holds only machine Pods.
            let count = match pods
                .list_metadata(&ListParams::default().limit(1))
                .await
            {
                Ok(l) => l.items.len() + usize::try_from(l.metadata.remaining_item_count.unwrap_or(0))?,
                Err(e) => {
                    note(&format!("SCALE: counting Pods failed ({e}); retrying"));
                    0
                }
            };
            if let Some((rss, _)) = op.memory_kib() {
                peak_rss = peak_rss.max(rss);
                note(&format!(
                    "SCALE: {:.0} s: {count} Pods, operator VmRSS {rss} KiB",
                    started.elapsed().as_secs_f64()
                ));
            }
            if count >= machines_count {
                break;
            }
            ensure!(Instant::now() < deadline, "only {count} of {machines_count} Pods before the deadline");
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        let done = started.elapsed().as_secs_f64();
        let placed = env.check_invariants().await?;
        ensure!(placed == machines_count, "{placed} of {machines_count} placed");
        // Settle: the status writes and watch events of the last placements drain.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let Some((rss, peak)) = op.memory_kib() else {
            bail!("could not read the operator's memory from /proc");
        };
        note(&format!(
            "SCALE: {machines_count} machines over {nodes} GpuNodes, all Pods in {done:.1} s; \
             operator VmRSS {rss} KiB ({:.1} MB), VmHWM {peak} KiB ({:.1} MB), largest sampled VmRSS {peak_rss} KiB",
            rss as f64 * 1024.0 / 1e6,
            peak as f64 * 1024.0 / 1e6
        ));
        ensure!(
            rss <= RSS_GOAL_KIB,
            "operator VmRSS {rss} KiB exceeds the {RSS_GOAL_KIB} KiB (100 MB) goal"
        );
        Ok(())
    }
    .await;
    if let Err(e) = result {
        bail!("{e:#}\n--- operator ---\n{}", op.describe());
    }
    env.cleanup().await;
    Ok(())
}

/// Applies the machines 8 at a time; an overloaded API server's transient failures (504,
/// dropped connections) are retried, a rejection is not.
async fn apply_with_retries(env: &TestEnv, machines: &[GpuMachine]) -> anyhow::Result<()> {
    use futures::{StreamExt as _, TryStreamExt as _};
    futures::stream::iter(machines.iter().map(|m| async move {
        let mut attempt = 0;
        loop {
            match env.apply(m).await {
                Ok(_) => return anyhow::Ok(()),
                Err(kube::Error::Api(s)) if s.code < 500 => {
                    return Err(kube::Error::Api(s))
                        .with_context(|| format!("applying {}", m.name_any()));
                }
                Err(e) if attempt >= 10 => {
                    return Err(e).with_context(|| format!("applying {}", m.name_any()));
                }
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }))
    .buffer_unordered(8)
    .try_collect::<Vec<_>>()
    .await?;
    Ok(())
}
