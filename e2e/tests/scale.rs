//! Operator memory at scale against a real kube-apiserver: 10,000 GpuMachines over 1,250
//! eight-GPU GpuNodes, all placed with their Pods, and the operator's resident memory
//! (goal: ≤ 100 MB).
//!
//! Not part of the default run (it takes many minutes on a small box): run it with
//! `cargo test -p gpuvm-e2e --test scale -- --ignored --nocapture`, and with
//! `GPUVM_OPERATOR_BIN=target/release/gpuvm-operator` to measure the operator as it is
//! deployed (a debug build's binary alone is ~15 MB more).
//! `GPUVM_E2E_SCALE_MACHINES` (default 10000) sets the size; nodes are machines / 8.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use gpuvm_api::GpuMachine;
use gpuvm_e2e::{HostKind, OperatorOptions, TestEnv, bench, note};

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
    env.add_hosts(HostKind::H100Pcie, nodes).await?;
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
        // A generous bound: about 4 machines/s on a loaded 2-core box.
        let timeout = Duration::from_secs(300 + u64::try_from(machines_count / 4)?);
        let before = op.memory();
        let cpu = bench::CpuUse::read(&env, &op);
        let requests = bench::ApiRequests::read(&env).await?;
        let mut peak_rss = 0;
        let run = bench::place_all(
            &env,
            &machines,
            8,
            timeout,
            Duration::from_secs(10),
            |count| {
                if let Some(m) = op.memory() {
                    peak_rss = peak_rss.max(m.rss);
                    note(&format!("SCALE: {count} machines with a Pod, operator {m}"));
                }
            },
        )
        .await?;
        note(&format!("SCALE: over {nodes} GpuNodes: {run}"));
        for line in cpu.lines_until(&bench::CpuUse::read(&env, &op), machines_count) {
            note(&format!("SCALE: {line}"));
        }
        for line in requests.lines_until(&bench::ApiRequests::read(&env).await?, machines_count) {
            note(&format!("SCALE: {line}"));
        }
        let placed = env.check_invariants().await?;
        ensure!(
            placed == machines_count,
            "{placed} of {machines_count} placed"
        );
        // Settle: the status writes and watch events of the last placements drain.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let Some(after) = op.memory() else {
            bail!("could not read the operator's memory from /proc");
        };
        let rss = after.rss;
        note(&format!(
            "SCALE: {machines_count} machines over {nodes} GpuNodes; operator {after} \
             ({:.1} MB), largest sampled VmRSS {peak_rss} KiB",
            rss as f64 * 1024.0 / 1e6,
        ));
        if let Some(before) = before {
            // What each machine costs: the growth over the operator with no machine (its
            // caches of the nodes, its connections, the binary's pages).
            let per_machine = |a: u64, b: u64| a.saturating_sub(b) * 1024 / machines_count as u64;
            note(&format!(
                "SCALE: with no machine: {before}; per machine: VmRSS {} B, RssAnon {} B",
                per_machine(after.rss, before.rss),
                per_machine(after.anon, before.anon)
            ));
        }
        note(&format!("OPERATOR_RSS_KB={rss} machines={machines_count}"));
        if let Ok(metrics) = op.metrics().await {
            for line in bench::timing_lines(&metrics) {
                note(&format!("SCALE: operator {line}"));
            }
        }
        ensure!(
            rss <= RSS_GOAL_KIB,
            "operator VmRSS {rss} KiB exceeds the {RSS_GOAL_KIB} KiB (100 MB) goal"
        );
        Ok(())
    }
    .await;
    env.finish(result, &mut [&mut op]).await
}
