//! Node loss against a real kube-apiserver: machines whose node is deleted, NotReady past
//! the grace period, or whose GpuNode stops its heartbeat are placed again on other
//! nodes (new GPUs, an Event and the `NodeLost` condition saying why); a machine pinned
//! to its node by `nodeSelector` waits for it instead, and says so.
//!
//! Prints `SKIPPED: <reason>` and passes when no API server is configured (see the crate
//! README); `GPUVM_REQUIRE=apiserver` makes that a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use gpuvm_api::{GpuAllocation, GpuMachine, keys};
use gpuvm_e2e::invariants::pinned_node;
use gpuvm_e2e::{Beat, Check, HostKind, OperatorOptions, TestEnv, note};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// The operator's grace for a NotReady node in this test.
const GRACE_SECONDS: u64 = 3;
/// The operator's heartbeat timeout: above the keeper's 10 s beat, so healthy nodes
/// never look stale.
const HEARTBEAT_TIMEOUT_SECONDS: u64 = 25;
/// How long a move may take: the slowest cause (a stopped heartbeat) needs up to
/// timeout + grace + one keeper period before it counts, then a sweep and a placement.
const T_MOVE: Duration = Duration::from_secs(120);
const T: Duration = Duration::from_secs(60);

fn node_lost(m: &GpuMachine) -> Option<&Condition> {
    m.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "NodeLost"))
}

fn placed_on(m: &GpuMachine) -> Option<String> {
    m.status
        .as_ref()
        .filter(|s| s.is_placed())
        .and_then(|s| s.node_name.clone())
}

/// Moved: placed on a node that is not lost, with the condition telling the cause.
fn moved(lost: BTreeSet<String>, phrase: &'static str) -> impl Fn(&GpuMachine) -> Check<()> {
    move |m| {
        let Some(node) = placed_on(m) else {
            return Err("not placed".to_owned());
        };
        if lost.contains(&node) {
            return Err(format!("still on lost node {node}"));
        }
        match node_lost(m) {
            Some(c) if c.message.contains(phrase) => Ok(()),
            other => Err(format!(
                "on {node}, NodeLost condition {other:?} does not say {phrase:?}"
            )),
        }
    }
}

async fn events_about(env: &TestEnv, machine: &str, reason: &str) -> anyhow::Result<Vec<String>> {
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.namespace);
    Ok(events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(machine)
                && e.reason.as_deref() == Some(reason)
        })
        .filter_map(|e| e.note)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_on_lost_nodes_move_and_pinned_ones_wait() -> anyhow::Result<()> {
    let Some(mut env) = TestEnv::start("node-loss").await? else {
        return Ok(());
    };
    // One GPU per host: four machines fill four hosts, three hosts are spare.
    let hosts = env.add_hosts(HostKind::L40sWorkstation, 7).await?;
    let options = OperatorOptions {
        heartbeat_timeout_seconds: HEARTBEAT_TIMEOUT_SECONDS,
        node_lost_grace_seconds: Some(GRACE_SECONDS),
        ..OperatorOptions::single(&env.namespace)
    };
    let op = env.start_operator(options).await?;
    let mut op = op;

    let result = async {
        let pin_node = hosts[6].clone();
        let mut pinned = env.machine("pinned", "l40s", 1);
        pinned
            .spec
            .node_selector
            .insert("kubernetes.io/hostname".to_owned(), pin_node.clone());
        env.apply(&pinned).await?;
        env.wait_machine("pinned", "placed on its node", T, |m| match placed_on(m) {
            Some(n) if n == pin_node => Ok(()),
            other => Err(format!("placed on {other:?}")),
        })
        .await?;
        let names = ["gone", "down", "silent"];
        for name in names {
            env.apply(&env.machine(name, "l40s", 1)).await?;
        }
        env.wait_pod_count(4, T).await?;
        let mut before: BTreeMap<&str, String> = BTreeMap::new();
        for name in names {
            let m = env
                .wait_machine(name, "placed", T, |m| {
                    placed_on(m)
                        .map(|_| ())
                        .ok_or_else(|| "not placed".to_owned())
                })
                .await?;
            before.insert(name, placed_on(&m).unwrap_or_default());
        }
        note(&format!(
            "e2e: node-loss: placed {before:?}, pinned on {pin_node}"
        ));

        // Lose four nodes, three ways.
        let nodes: Api<Node> = Api::all(env.client.clone());
        for node in [&before["gone"], &pin_node] {
            env.stop_beat(node, Beat::NodeReady);
            env.stop_beat(node, Beat::GpuNodeHeartbeat);
            nodes.delete(node, &DeleteParams::default()).await?;
        }
        env.stop_beat(&before["down"], Beat::NodeReady);
        nodes
            .patch_status(
                &before["down"],
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": [{
                    "type": "Ready",
                    "status": "False",
                    "reason": "KubeletNotReady",
                    "message": "gpuvm e2e: the kubelet stopped",
                    "lastHeartbeatTime": gpuvm_e2e::fixtures::now(),
                    "lastTransitionTime": gpuvm_e2e::fixtures::now(),
                }]}})),
            )
            .await?;
        env.stop_beat(&before["silent"], Beat::GpuNodeHeartbeat);
        let lost: BTreeSet<String> = before.values().cloned().chain([pin_node.clone()]).collect();

        let phrases = [
            ("gone", "was deleted", "NodeDeleted"),
            ("down", "has not been Ready", "NodeNotReady"),
            ("silent", "heartbeat", "GpuNodeHeartbeatLost"),
        ];
        for (name, phrase, _) in phrases {
            env.wait_machine(
                name,
                "moved off its lost node",
                T_MOVE,
                moved(lost.clone(), phrase),
            )
            .await?;
        }
        let pods = env.pods();
        for (name, phrase, reason) in phrases {
            let m = env
                .wait_machine(name, "a Pod on its new node", T, |m| {
                    match m.status.as_ref().and_then(|s| s.pod_name.clone()) {
                        Some(_) => Ok(()),
                        None => Err("no Pod yet".to_owned()),
                    }
                })
                .await?;
            let node = placed_on(&m).unwrap_or_default();
            let pod_name = m
                .status
                .as_ref()
                .and_then(|s| s.pod_name.clone())
                .unwrap_or_default();
            let pod: Pod = env.wait_pod(&pod_name, T).await?;
            ensure!(
                pinned_node(&pod).as_deref() == Some(node.as_str()),
                "{name}'s Pod {pod_name} is pinned to {:?}, the machine is on {node}",
                pinned_node(&pod)
            );
            let c = node_lost(&m).context("no NodeLost condition")?;
            ensure!(
                c.message.contains(&before[name]),
                "{name}'s NodeLost condition does not name the lost node {}: {c:?}",
                before[name]
            );
            // The Event keeps the cause after the condition moved on.
            let notes = events_about(&env, name, "NodeLost").await?;
            ensure!(
                notes.iter().any(|n| n.contains(phrase)),
                "{name}: no NodeLost Event saying {phrase:?} ({reason}): {notes:?}"
            );
            note(&format!(
                "e2e: node-loss: {name} moved from {} to {node}: {}",
                before[name], c.message
            ));
        }

        // The lost nodes' records were released by the operator's CAS: none of the moved
        // machines is listed there any more, and the pinned one still is.
        let records: Api<GpuAllocation> = Api::all(env.client.clone());
        for name in names {
            let uid = env.machines().get(name).await?.uid().unwrap_or_default();
            if let Some(r) = records.get_opt(&before[name]).await? {
                ensure!(
                    r.spec.holdings(&uid).is_empty(),
                    "the record of lost node {} still lists {name}",
                    before[name]
                );
            }
        }

        let waiting = env
            .wait_machine(
                "pinned",
                "told it waits for its node",
                T,
                |m| match node_lost(m) {
                    Some(c)
                        if c.status == "True"
                            && c.reason == "NodeDeleted"
                            && c.message.contains("pinned") =>
                    {
                        Ok(())
                    }
                    other => Err(format!("NodeLost condition {other:?}")),
                },
            )
            .await?;
        ensure!(
            placed_on(&waiting).as_deref() == Some(pin_node.as_str()),
            "the pinned machine left its node: {:?}",
            placed_on(&waiting)
        );
        let pinned_uid = waiting.uid().unwrap_or_default();
        let record = records
            .get(&pin_node)
            .await
            .context("the pinned node's record")?;
        ensure!(
            !record.spec.holdings(&pinned_uid).is_empty(),
            "the pinned machine's GPUs were released from its node's record"
        );
        ensure!(
            !events_about(&env, "pinned", "NodeLost").await?.is_empty(),
            "no NodeLost Event for the pinned machine"
        );
        // No double allocation anywhere, and statuses agree with the records.
        env.check_invariants().await?;
        let machines = env.machines().list(&ListParams::default()).await?.items;
        let errors = gpuvm_e2e::invariants::check_records(
            &machines,
            &records.list(&ListParams::default()).await?.items,
        );
        ensure!(
            errors.is_empty(),
            "statuses disagree with the records: {errors:?}"
        );

        // The pinned node comes back: the machine stays and the condition clears.
        nodes
            .create(
                &PostParams::default(),
                &gpuvm_e2e::fixtures::node(&pin_node, HostKind::L40sWorkstation, &env.run),
            )
            .await?;
        nodes
            .patch_status(
                &pin_node,
                &PatchParams::default(),
                &Patch::Merge(gpuvm_e2e::fixtures::node_ready_patch()),
            )
            .await?;
        env.gpu_nodes()
            .patch_status(
                &pin_node,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"heartbeat": gpuvm_e2e::fixtures::now()}})),
            )
            .await?;
        env.resume_beat(&pin_node, Beat::NodeReady);
        env.resume_beat(&pin_node, Beat::GpuNodeHeartbeat);
        let back = env
            .wait_machine("pinned", "its node is back", T, |m| match node_lost(m) {
                Some(c) if c.status == "False" && c.reason == "NodeRecovered" => Ok(()),
                other => Err(format!("NodeLost condition {other:?}")),
            })
            .await?;
        ensure!(placed_on(&back).as_deref() == Some(pin_node.as_str()));
        let pods_now = pods
            .list(&ListParams::default().labels(keys::LABEL_MACHINE))
            .await?
            .items;
        ensure!(
            pods_now.len() == 4,
            "{} machine Pods, want 4",
            pods_now.len()
        );
        Ok(())
    }
    .await;
    env.finish(result, &mut [&mut op]).await
}
