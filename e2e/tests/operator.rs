//! The operator against a real kube-apiserver: CRD validation, placement, the Pods it
//! creates, status and conditions, deletion, crashes, two replicas, and throughput.
//!
//! Every test prints `SKIPPED: <reason>` and passes when no API server is configured
//! (see the crate README). Tests take turns on the control plane (one at a time).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use gpuvm_api::{
    ConditionType, EnvVar, GpuAllocation, GpuMachine, GuestResources, MachinePhase, RestartPolicy,
    keys,
};
use gpuvm_e2e::cluster::HEARTBEAT;
use gpuvm_e2e::fixtures::{L40S_AUDIO, L40S_GPU};
use gpuvm_e2e::invariants::pinned_node;
use gpuvm_e2e::{Check, HostKind, OperatorOptions, TestEnv, bench, note};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Resource as _, ResourceExt as _};
use serde_json::{Value, json};

/// How long anything the operator does on its own may take.
const T: Duration = Duration::from_secs(60);
/// Unschedulable machines are retried every 30 s (and on every node heartbeat).
const T_RETRY: Duration = Duration::from_secs(90);

fn condition(m: &GpuMachine, kind: ConditionType) -> Option<&Condition> {
    m.status.as_ref().and_then(|s| s.condition(kind))
}

fn phase_is(want: MachinePhase) -> impl Fn(&GpuMachine) -> Check<()> {
    move |m| {
        if m.phase() == want {
            Ok(())
        } else {
            Err(format!("phase {}", m.phase()))
        }
    }
}

fn scheduled_false(m: &GpuMachine) -> Check<()> {
    match condition(m, ConditionType::Scheduled) {
        Some(c) if c.status == "False" => Ok(()),
        other => Err(format!("Scheduled condition {other:?}")),
    }
}

fn set(manifest: &mut Value, path: &[&str], value: Value) {
    let mut at = &mut manifest["spec"];
    for key in path {
        at = &mut at[*key];
    }
    *at = value;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_machines_are_rejected_with_the_cel_message() -> anyhow::Result<()> {
    let Some(env) = TestEnv::start("validation").await? else {
        return Ok(());
    };
    // No operator here: the API server alone validates.
    let valid = env.machine("valid", "h100-80gb", 2);
    let created = env
        .apply(&valid)
        .await
        .context("a valid machine must be accepted")?;
    assert_eq!(created.spec.restart_policy, RestartPolicy::Never);
    assert!(created.metadata.generation.is_some());

    let base = serde_json::to_value(&valid)?;
    let cases: [(&str, &[&str], Value, &str); 10] = [
        (
            "count-zero",
            &["gpu", "count"],
            json!(0),
            "spec.gpu.count must be between 1 and 8",
        ),
        (
            "count-nine",
            &["gpu", "count"],
            json!(9),
            "spec.gpu.count must be between 1 and 8",
        ),
        (
            "cpus-zero",
            &["guest", "cpus"],
            json!(0),
            "spec.guest.cpus must be between 1 and 256",
        ),
        (
            "memory-lots",
            &["guest", "memory"],
            json!("lots"),
            "spec.guest.memory must be a Kubernetes quantity of at least 128Mi",
        ),
        (
            "memory-tiny",
            &["guest", "memory"],
            json!("1Mi"),
            "spec.guest.memory must be a Kubernetes quantity of at least 128Mi",
        ),
        (
            "restart-sometimes",
            &["restartPolicy"],
            json!("Sometimes"),
            "Unsupported value: \"Sometimes\"",
        ),
        (
            "image-empty",
            &["image"],
            json!(""),
            "spec.image must name a container image",
        ),
        (
            "image-blank",
            &["image"],
            json!("   "),
            "spec.image must name a container image",
        ),
        (
            "model-upper",
            &["gpu", "model"],
            json!("H100 80GB"),
            "spec.gpu.model must be a lowercase model name",
        ),
        (
            "model-missing",
            &["gpu", "model"],
            Value::Null,
            "spec.gpu.model",
        ),
    ];
    let mut failures = Vec::new();
    for (name, path, value, want) in cases {
        let mut manifest = base.clone();
        manifest["metadata"]["name"] = json!(name);
        if value.is_null() {
            // Drop the field entirely: a required field is missing.
            if let Some(gpu) = manifest["spec"]["gpu"].as_object_mut() {
                gpu.remove("model");
            }
        } else {
            set(&mut manifest, path, value);
        }
        if let Err(failure) = env.expect_invalid(name, &manifest, want).await {
            failures.push(failure);
        }
        if env.machines().get_opt(name).await?.is_some() {
            failures.push(format!("{name}: exists after its rejection"));
        }
    }
    ensure!(
        failures.is_empty(),
        "validation:\n  {}",
        failures.join("\n  ")
    );

    // Before it is scheduled, gpu and guest may change.
    let mut resized = serde_json::to_value(&valid)?;
    set(&mut resized, &["gpu", "count"], json!(4));
    env.apply_json("valid", &resized)
        .await
        .context("an unscheduled machine may change its GPU count")?;

    // Once scheduled (status.nodeName set, as the operator does), they are frozen.
    env.machines()
        .patch_status(
            "valid",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"nodeName": "some-node", "phase": "Scheduled"}})),
        )
        .await
        .context("writing status.nodeName through the status subresource")?;
    let frozen = "spec.gpu and spec.guest cannot change once the machine is scheduled";
    for (path, value) in [
        (&["gpu", "count"][..], json!(2)),
        (&["guest", "cpus"][..], json!(64)),
        (&["gpu", "model"][..], json!("l40s")),
    ] {
        let mut changed = resized.clone();
        set(&mut changed, path, value.clone());
        let status = env
            .apply_rejected("valid", &changed)
            .await
            .with_context(|| {
                format!("changing spec.{} to {value} once scheduled", path.join("."))
            })?;
        ensure!(
            status.message.contains(frozen),
            "changing spec.{}: want {frozen:?}, got {:?}",
            path.join("."),
            status.message
        );
    }
    // Other fields stay editable.
    let mut env_changed = resized.clone();
    env_changed["spec"]["env"] = json!([{"name": "EPOCHS", "value": "5"}]);
    let updated = env
        .apply_json("valid", &env_changed)
        .await
        .context("env may change after scheduling")?;
    assert_eq!(updated.spec.gpu.count, 4);
    assert_eq!(updated.spec.env[0].value, "5");
    env.cleanup().await;
    Ok(())
}

/// Checks a machine's Pod field by field against the machine.
fn check_pod(pod: &Pod, m: &GpuMachine) -> anyhow::Result<()> {
    let name = m.name_any();
    let status = m.status.as_ref().context("the machine has no status")?;
    let node = status
        .node_name
        .clone()
        .context("the machine has no node")?;
    let spec = pod.spec.as_ref().context("the Pod has no spec")?;
    let mut wrong = Vec::new();
    let mut expect = |what: &str, ok: bool, seen: String| {
        if !ok {
            wrong.push(format!("{what}: {seen}"));
        }
    };

    expect(
        "runtimeClassName gpuvm",
        spec.runtime_class_name.as_deref() == Some(keys::RUNTIME_CLASS),
        format!("{:?}", spec.runtime_class_name),
    );
    expect(
        "node affinity matchFields metadata.name In [node]",
        pinned_node(pod).as_deref() == Some(node.as_str()),
        format!("{:?}", spec.affinity),
    );
    let terms = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| r.node_selector_terms.len());
    expect(
        "exactly one node selector term",
        terms == Some(1),
        format!("{terms:?}"),
    );
    expect(
        "toleration gpuvm.dev/gpu-node:NoSchedule",
        spec.tolerations.iter().flatten().any(|t| {
            t.key.as_deref() == Some(keys::TAINT_GPU_NODE)
                && t.effect.as_deref() == Some("NoSchedule")
                && t.operator.as_deref() == Some("Exists")
        }),
        format!("{:?}", spec.tolerations),
    );
    expect(
        "restartPolicy Never (the operator restarts)",
        spec.restart_policy.as_deref() == Some("Never"),
        format!("{:?}", spec.restart_policy),
    );
    expect(
        "no service account token",
        spec.automount_service_account_token == Some(false),
        format!("{:?}", spec.automount_service_account_token),
    );

    let annotations = pod.annotations();
    let annotation = |k: &str| annotations.get(k).cloned().unwrap_or_default();
    expect(
        "annotation gpuvm.dev/devices",
        annotation(keys::ANNOTATION_DEVICES) == status.devices().join(","),
        format!(
            "{:?} vs status {:?}",
            annotation(keys::ANNOTATION_DEVICES),
            status.devices()
        ),
    );
    expect(
        "annotation gpuvm.dev/cpus",
        annotation(keys::ANNOTATION_CPUS) == m.spec.guest.cpus.to_string(),
        annotation(keys::ANNOTATION_CPUS),
    );
    expect(
        "annotation gpuvm.dev/memory",
        annotation(keys::ANNOTATION_MEMORY) == m.spec.guest.memory,
        annotation(keys::ANNOTATION_MEMORY),
    );
    expect(
        "label gpuvm.dev/machine",
        pod.labels().get(keys::LABEL_MACHINE) == Some(&name),
        format!("{:?}", pod.labels()),
    );

    let owners: Vec<_> = pod
        .owner_references()
        .iter()
        .filter(|o| o.controller == Some(true))
        .collect();
    expect(
        "one controller ownerReference to the machine",
        owners.len() == 1
            && owners[0].api_version == "gpuvm.dev/v1alpha1"
            && owners[0].kind == "GpuMachine"
            && owners[0].name == name
            && Some(&owners[0].uid) == m.meta().uid.as_ref(),
        format!(
            "{:?} (machine uid {:?})",
            pod.owner_references(),
            m.meta().uid
        ),
    );

    match spec.containers.as_slice() {
        [c] => {
            expect(
                "container image",
                c.image.as_deref() == Some(m.spec.image.as_str()),
                format!("{:?}", c.image),
            );
            expect(
                "container command",
                c.command.clone().unwrap_or_default() == m.spec.command,
                format!("{:?}", c.command),
            );
            expect(
                "container args",
                c.args.clone().unwrap_or_default() == m.spec.args,
                format!("{:?}", c.args),
            );
            let env: Vec<(String, String)> = c
                .env
                .iter()
                .flatten()
                .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
                .collect();
            let want: Vec<(String, String)> = m
                .spec
                .env
                .iter()
                .map(|e| (e.name.clone(), e.value.clone()))
                .collect();
            expect("container env", env == want, format!("{env:?}"));
            let requests = c
                .resources
                .as_ref()
                .and_then(|r| r.requests.clone())
                .unwrap_or_default();
            let request = |k: &str| requests.get(k).map(|q| q.0.clone()).unwrap_or_default();
            expect(
                "cpu request = guest cpus",
                request("cpu") == m.spec.guest.cpus.to_string(),
                request("cpu"),
            );
            expect(
                "memory request = guest memory",
                request("memory") == m.spec.guest.memory,
                request("memory"),
            );
        }
        other => expect(
            "exactly one container",
            false,
            format!("{} containers", other.len()),
        ),
    }
    ensure!(
        wrong.is_empty(),
        "Pod {} is wrong:\n  {}",
        pod.name_any(),
        wrong.join("\n  ")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_places_machines_and_builds_their_pods() -> anyhow::Result<()> {
    let Some((mut env, h100, mut op)) =
        TestEnv::with_operator("pods-and-status", HostKind::H100Pcie, 2).await?
    else {
        return Ok(());
    };
    let ws = env.add_hosts(HostKind::L40sWorkstation, 1).await?;

    let mut train = env.machine("train", "h100-80gb", 2);
    train.spec.env.push(EnvVar {
        name: "EPOCHS".to_owned(),
        value: "3".to_owned(),
        ..Default::default()
    });
    train.spec.guest = GuestResources {
        cpus: 16,
        memory: "64Gi".to_owned(),
    };
    let mut render = env.machine("render", "l40s", 1);
    render.spec.guest = GuestResources {
        cpus: 6,
        memory: "24Gi".to_owned(),
    };
    render.spec.command = Vec::new();
    render.spec.args = Vec::new();
    env.apply(&train).await?;
    env.apply(&render).await?;

    let result = async {
        // No kubelet: the Pods stay Pending, so the machines settle in Booting.
        let train_pod = env.wait_pod("train-vm", T).await?;
        let train = env
            .wait_machine("train", "phase Booting", T, phase_is(MachinePhase::Booting))
            .await?;
        check_pod(&train_pod, &train)?;
        let status = train.status.clone().unwrap_or_default();
        let node = status.node_name.clone().unwrap_or_default();
        ensure!(h100.contains(&node), "train is on {node}, not an H100 node");
        ensure!(
            status.pod_name.as_deref() == Some("train-vm"),
            "podName {:?}",
            status.pod_name
        );
        ensure!(status.gpus.len() == 2, "train holds {:?}", status.gpus);
        ensure!(
            status.gpus.iter().all(|g| g.model == "h100-80gb"),
            "models {:?}",
            status.gpus
        );
        let numa: BTreeSet<_> = status.gpus.iter().map(|g| g.numa_node).collect();
        ensure!(
            numa.len() == 1,
            "two GPUs of an empty HGX span NUMA nodes {numa:?}"
        );
        let generation = train.metadata.generation;
        ensure!(
            status.observed_generation == generation,
            "observedGeneration {:?} vs {generation:?}",
            status.observed_generation
        );
        let scheduled =
            condition(&train, ConditionType::Scheduled).context("no Scheduled condition")?;
        ensure!(
            scheduled.status == "True" && scheduled.reason == "Scheduled",
            "Scheduled condition {scheduled:?}"
        );
        ensure!(
            scheduled.observed_generation == generation,
            "condition observedGeneration {:?}",
            scheduled.observed_generation
        );
        for kind in [ConditionType::VmReady, ConditionType::Ready] {
            let c = condition(&train, kind)
                .with_context(|| format!("no {} condition", kind.as_str()))?;
            ensure!(
                c.status == "False",
                "{} while no VM runs: {c:?}",
                kind.as_str()
            );
        }
        ensure!(
            train.finalizers().iter().any(|f| f == keys::FINALIZER),
            "finalizers {:?}",
            train.finalizers()
        );
        // The node's allocation record, where ownership is decided, gives train its GPUs.
        let record = Api::<GpuAllocation>::all(env.client.clone())
            .get(&node)
            .await
            .context("reading the GpuAllocation of train's node")?;
        let held = gpuvm_api::AllocatedGpu::devices(
            &record.spec.holdings(&train.uid().unwrap_or_default()),
        );
        ensure!(
            held == status.devices(),
            "the record gives train {held:?}, its status says {:?}",
            status.devices()
        );

        // The L40S goes with its audio function, in that order.
        let render_pod = env.wait_pod("render-vm", T).await?;
        let render = env
            .wait_machine(
                "render",
                "phase Booting",
                T,
                phase_is(MachinePhase::Booting),
            )
            .await?;
        check_pod(&render_pod, &render)?;
        let rs = render.status.clone().unwrap_or_default();
        ensure!(
            rs.node_name.as_ref() == ws.first(),
            "render on {:?}",
            rs.node_name
        );
        ensure!(
            render_pod.annotations().get(keys::ANNOTATION_DEVICES)
                == Some(&format!("{L40S_GPU},{L40S_AUDIO}")),
            "devices {:?}",
            render_pod.annotations().get(keys::ANNOTATION_DEVICES)
        );
        ensure!(
            rs.gpus.first().map(|g| g.companions.clone()) == Some(vec![L40S_AUDIO.to_owned()]),
            "companions {:?}",
            rs.gpus
        );

        // No node has the model: Scheduled=False with the scheduler's summary.
        env.apply(&env.machine("nope", "a100-40gb", 1)).await?;
        let nope = env
            .wait_machine("nope", "Scheduled=False", T, scheduled_false)
            .await?;
        let c = condition(&nope, ConditionType::Scheduled).context("no Scheduled condition")?;
        ensure!(
            c.reason == "Unschedulable" && c.message.starts_with("no node has"),
            "unschedulable condition {c:?}"
        );
        ensure!(
            nope.phase() == MachinePhase::Pending,
            "phase {}",
            nope.phase()
        );
        ensure!(
            env.pods().get_opt("nope-vm").await?.is_none(),
            "an unschedulable machine got a Pod"
        );
        note(&format!("e2e: nope: {}", c.message));

        // The only L40S is taken: a second one waits...
        env.apply(&env.machine("render-2", "l40s", 1)).await?;
        let waiting = env
            .wait_machine("render-2", "Scheduled=False", T, scheduled_false)
            .await?;
        let c = condition(&waiting, ConditionType::Scheduled).context("no Scheduled condition")?;
        ensure!(
            c.message.starts_with("no node has"),
            "waiting condition {c:?}"
        );

        // ... until the first is deleted: its Pod goes (the finalizer), then the
        // machine, and the freed GPU goes to the waiting machine.
        env.delete_machine("render").await?;
        env.wait_gone(&env.pods(), "render-vm", T).await?;
        env.wait_gone(&env.machines(), "render", T).await?;
        let pod = env.wait_pod("render-2-vm", T_RETRY).await?;
        ensure!(
            pod.annotations().get(keys::ANNOTATION_DEVICES)
                == Some(&format!("{L40S_GPU},{L40S_AUDIO}")),
            "render-2 devices {:?}",
            pod.annotations().get(keys::ANNOTATION_DEVICES)
        );
        let placed = check_all(&env).await?;
        ensure!(
            placed == 2,
            "{placed} machines placed, want train and render-2"
        );
        Ok(())
    }
    .await;
    env.finish(result, &mut [&mut op]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_only_an_nvswitch_node_could_take_waits_for_want_of_fabric_manager()
-> anyhow::Result<()> {
    let Some((mut env, hgx, mut op)) =
        TestEnv::with_operator("fabric-manager", HostKind::HgxH100, 1).await?
    else {
        return Ok(());
    };
    let result = async {
        env.apply(&env.machine("big", "h100-80gb", 8)).await?;
        let refused = env
            .wait_machine("big", "Scheduled=False", T, scheduled_false)
            .await?;
        let c = condition(&refused, ConditionType::Scheduled).context("no Scheduled condition")?;
        let named = format!("{} has 4 NVSwitches (h100-nvswitch)", hgx[0]);
        ensure!(
            c.reason == "FabricManagerUnavailable"
                && c.message.contains(&named)
                && c.message.contains("Fabric Manager"),
            "condition {c:?}"
        );
        note(&format!("e2e: fabric-manager: {}", c.message));
        // Retried on every heartbeat: still no Pod, no GPU taken, and one Event.
        tokio::time::sleep(HEARTBEAT + Duration::from_secs(2)).await;
        ensure!(
            env.pods().get_opt("big-vm").await?.is_none(),
            "a refused machine got a Pod"
        );
        let records: Api<GpuAllocation> = Api::all(env.client.clone());
        let held = records
            .get_opt(&hgx[0])
            .await?
            .map(|r| r.spec.devices.len())
            .unwrap_or(0);
        ensure!(held == 0, "{held} devices of {} were taken", hgx[0]);
        let events = env.events("big", "FailedScheduling").await?;
        ensure!(
            events.len() == 1,
            "{} FailedScheduling Events",
            events.len()
        );
        ensure!(
            events[0].note.as_deref() == Some(c.message.as_str()),
            "Event note {:?}",
            events[0].note
        );

        // A node without NVSwitches comes: the machine goes there.
        let pcie = env.add_hosts(HostKind::H100Pcie, 1).await?;
        env.wait_pod("big-vm", T_RETRY).await?;
        let placed = env
            .wait_machine("big", "Scheduled=True", T, |m| {
                match condition(m, ConditionType::Scheduled) {
                    Some(c) if c.status == "True" => Ok(()),
                    other => Err(format!("Scheduled condition {other:?}")),
                }
            })
            .await?;
        let node = placed.status.and_then(|s| s.node_name).unwrap_or_default();
        ensure!(node == pcie[0], "big is on {node}, want {}", pcie[0]);
        check_all(&env).await?;
        Ok(())
    }
    .await;
    env.finish(result, &mut [&mut op]).await
}

/// The harness's invariants plus the records: every placed machine's status mirrors
/// what its node's GpuAllocation gives it. Returns how many machines are placed.
async fn check_all(env: &TestEnv) -> anyhow::Result<usize> {
    let placed = env.check_invariants().await?;
    let machines = env.machines().list(&ListParams::default()).await?.items;
    let records = Api::<GpuAllocation>::all(env.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let errors = gpuvm_e2e::invariants::check_records(&machines, &records);
    ensure!(
        errors.is_empty(),
        "statuses disagree with the allocation records:\n  {}",
        errors.join("\n  ")
    );
    Ok(placed)
}

/// How many rounds the race and kill/restart tests run, each on a fresh control plane:
/// `GPUVM_E2E_REPEAT` (default 1). `scripts/e2e-repeat.sh` runs them 20 times.
fn repeat() -> usize {
    std::env::var("GPUVM_E2E_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// Runs `round` `repeat()` times, stopping at the first failure, and says how many passed.
async fn rounds<F, Fut>(test: &str, mut round: F) -> anyhow::Result<()>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let total = repeat();
    for i in 0..total {
        match round(i).await {
            Ok(true) => {}
            // No API server: the round printed SKIPPED.
            Ok(false) => return Ok(()),
            Err(e) => {
                note(&format!(
                    "REPEAT: {test}: {i} of {total} passed, round {} failed",
                    i + 1
                ));
                return Err(e.context(format!("round {} of {total}", i + 1)));
            }
        }
    }
    note(&format!("REPEAT: {test}: {total} of {total} passed"));
    Ok(())
}

/// Twenty machines of one or two H100s (27 GPUs of the 40 on five HGX nodes).
fn twenty(env: &TestEnv, prefix: &str) -> Vec<GpuMachine> {
    (0..20)
        .map(|i| {
            let mut m = env.machine(
                &format!("{prefix}{i:02}"),
                "h100-80gb",
                if i % 3 == 0 { 2 } else { 1 },
            );
            if i % 2 == 1 {
                m.spec.placement = gpuvm_api::PlacementStrategy::Spread;
            }
            m
        })
        .collect()
}

async fn placed_count(env: &TestEnv) -> anyhow::Result<usize> {
    Ok(env
        .machines()
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|m| m.status.as_ref().is_some_and(|s| s.is_placed()))
        .count())
}

async fn all_booting(env: &TestEnv, n: usize) -> anyhow::Result<()> {
    let machines = env.machines();
    gpuvm_e2e::eventually(&format!("{n} machines in phase Booting"), T, || {
        let machines = machines.clone();
        async move {
            let list = machines.list(&ListParams::default()).await?.items;
            let booting = list
                .iter()
                .filter(|m| m.phase() == MachinePhase::Booting)
                .count();
            Ok(if booting == n && list.len() == n {
                Ok(())
            } else {
                Err(format!("{booting} of {} Booting", list.len()))
            })
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_killed_mid_placement_converges_without_double_allocation() -> anyhow::Result<()> {
    rounds("kill-restart", |_| kill_restart_round()).await
}

async fn kill_restart_round() -> anyhow::Result<bool> {
    let Some(mut env) = TestEnv::start("kill-restart").await? else {
        return Ok(false);
    };
    env.add_hosts(HostKind::H100Pcie, 5).await?;
    let mut first = env
        .start_operator(OperatorOptions::single(&env.namespace))
        .await?;
    let machines = twenty(&env, "m");

    // Apply the twenty while watching; SIGKILL the operator once the first is placed.
    let killer = async {
        let deadline = Instant::now() + T;
        loop {
            let placed = placed_count(&env).await.unwrap_or(0);
            if placed > 0 || Instant::now() > deadline {
                first.kill();
                return placed;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (applied, placed_at_kill) = tokio::join!(env.apply_all(&machines), killer);
    applied?;
    let after_kill = placed_count(&env).await?;
    note(&format!(
        "e2e: killed the operator with {placed_at_kill} of 20 machines placed ({after_kill} after the kill)"
    ));
    if after_kill == 20 {
        note(
            "e2e: note: every machine was placed before the kill landed; the restart is still checked",
        );
    }
    // What the dead operator left must already be consistent.
    check_all(&env).await.context("right after the SIGKILL")?;

    let mut second = env
        .start_operator(OperatorOptions::single(&env.namespace))
        .await?;
    let result = async {
        env.wait_pod_count(20, T).await?;
        all_booting(&env, 20).await?;
        let placed = check_all(&env).await?;
        ensure!(placed == 20, "{placed} of 20 placed");
        let pods = env
            .pods()
            .list(&ListParams::default().labels(keys::LABEL_MACHINE))
            .await?
            .items;
        ensure!(pods.len() == 20, "{} Pods for 20 machines", pods.len());
        Ok(())
    }
    .await;
    env.finish(result, &mut [&mut first, &mut second]).await?;
    Ok(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_leader_elected_operators_fail_over_without_double_allocation() -> anyhow::Result<()> {
    let Some(mut env) = TestEnv::start("leader-election").await? else {
        return Ok(());
    };
    env.add_hosts(HostKind::H100Pcie, 5).await?;
    let mut a = env
        .start_operator(OperatorOptions::elected(&env.namespace, "op-a"))
        .await?;
    let mut b = env
        .start_operator(OperatorOptions::elected(&env.namespace, "op-b"))
        .await?;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    let holder = |leases: Api<Lease>| async move {
        let lease = leases.get_opt("gpuvm-operator").await?;
        Ok::<_, anyhow::Error>(
            lease
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity)
                .unwrap_or_default(),
        )
    };

    let result = async {
        env.apply_all(&twenty(&env, "a")).await?;
        env.wait_pod_count(20, T).await?;
        all_booting(&env, 20).await?;
        ensure!(check_all(&env).await? == 20, "not all 20 placed");
        let leader = holder(leases.clone()).await?;
        ensure!(
            leader == "op-a" || leader == "op-b",
            "Lease holder {leader:?}"
        );
        note(&format!("e2e: {leader} leads; killing it"));
        if leader == "op-a" {
            a.kill();
        } else {
            b.kill();
        }

        // Eight more single-GPU machines: the survivor takes over once the Lease lapses.
        let more: Vec<GpuMachine> = (0..8)
            .map(|i| env.machine(&format!("b{i:02}"), "h100-80gb", 1))
            .collect();
        env.apply_all(&more).await?;
        env.wait_pod_count(28, T_RETRY).await?;
        all_booting(&env, 28).await?;
        ensure!(check_all(&env).await? == 28, "not all 28 placed");
        let survivor = if leader == "op-a" { "op-b" } else { "op-a" };
        let now = holder(leases.clone()).await?;
        ensure!(
            now == survivor,
            "Lease holder {now:?} after {leader} died, want {survivor}"
        );
        Ok(())
    }
    .await;
    env.finish(result, &mut [&mut a, &mut b]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_unelected_operators_racing_never_double_allocate() -> anyhow::Result<()> {
    rounds("two-racing", |_| racing_round()).await
}

async fn racing_round() -> anyhow::Result<bool> {
    let Some(mut env) = TestEnv::start("two-racing").await? else {
        return Ok(false);
    };
    // 24 GPUs for 24 single-GPU machines: every GPU is contested by both replicas.
    env.add_hosts(HostKind::H100Pcie, 3).await?;
    let mut a = env
        .start_operator(OperatorOptions::single(&env.namespace))
        .await?;
    let mut b = env
        .start_operator(OperatorOptions::single(&env.namespace))
        .await?;
    let machines: Vec<GpuMachine> = (0..24)
        .map(|i| env.machine(&format!("r{i:02}"), "h100-80gb", 1))
        .collect();
    let result = async {
        env.apply_all(&machines).await?;
        env.wait_pod_count(24, T_RETRY).await?;
        all_booting(&env, 24).await?;
        ensure!(check_all(&env).await? == 24, "not all 24 placed");
        Ok(())
    }
    .await;
    env.finish(result, &mut [&mut a, &mut b]).await?;
    Ok(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collector_removes_the_pod_of_a_machine_deleted_behind_the_operators_back()
-> anyhow::Result<()> {
    let Some(mut env) = TestEnv::start("garbage-collection").await? else {
        return Ok(());
    };
    if !env.cp.garbage_collector_or_skip("garbage-collection")? {
        return Ok(());
    }
    env.add_hosts(HostKind::L40sWorkstation, 1).await?;
    let mut op = env
        .start_operator(OperatorOptions::single(&env.namespace))
        .await?;
    env.apply(&env.machine("orphan", "l40s", 1)).await?;
    env.wait_pod("orphan-vm", T).await?;
    op.kill();
    // Without the operator nobody runs the finalizer: drop it by hand and delete.
    env.delete_machine("orphan").await?;
    env.machines()
        .patch(
            "orphan",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await?;
    env.wait_gone(&env.machines(), "orphan", T).await?;
    env.wait_gone(&env.pods(), "orphan-vm", T_RETRY)
        .await
        .context("the garbage collector should delete the Pod through its ownerReference")?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn placement_throughput_two_hundred_machines_over_twenty_five_nodes() -> anyhow::Result<()> {
    // The benchmark is 1,000 machines over 125 GpuNodes (GPUVM_E2E_BENCH_MACHINES=1000
    // GPUVM_E2E_BENCH_NODES=125); the default keeps the suite quick.
    let size = |var: &str, default: usize| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let nodes: usize = size("GPUVM_E2E_BENCH_NODES", 25);
    let machines_count: usize = size("GPUVM_E2E_BENCH_MACHINES", 200);
    let Some((env, _, mut op)) =
        TestEnv::with_operator("throughput", HostKind::H100Pcie, nodes).await?
    else {
        return Ok(());
    };
    let machines: Vec<GpuMachine> = (0..machines_count)
        .map(|i| env.machine(&format!("t{i:05}"), "h100-80gb", 1))
        .collect();

    let result = async {
        let cpu = bench::CpuUse::read(&env, &op);
        let requests = bench::ApiRequests::read(&env).await?;
        let run = bench::place_all(&env, &machines, 16, Duration::from_secs(600), Duration::from_secs(10), |_| {})
            .await?;
        note(&format!("THROUGHPUT: over {nodes} GpuNodes: {run}"));
        for line in cpu.lines_until(&bench::CpuUse::read(&env, &op), machines_count) {
            note(&format!("THROUGHPUT: {line}"));
        }
        for line in requests.lines_until(&bench::ApiRequests::read(&env).await?, machines_count) {
            note(&format!("THROUGHPUT: {line}"));
        }
        let placed = check_all(&env).await?;
        ensure!(placed == machines_count, "{placed} of {machines_count} placed");
        if let Some(memory) = op.memory() {
            note(&format!(
                "THROUGHPUT: operator memory with {machines_count} machines: {memory}"
            ));
        }
        // The API server's own limit on this machine, for comparison: as many plain Pods
        // created by a client, 64 requests at a time.
        let secs = bench::plain_pods(&env, machines_count, 64).await?.as_secs_f64();
        note(&format!(
            "THROUGHPUT: API server alone: {machines_count} plain Pods created in {secs:.1} s: {:.1} Pods/s",
            f64::from(u32::try_from(machines_count).unwrap_or(u32::MAX)) / secs
        ));
        for line in bench::timing_lines(&op.metrics().await?) {
            note(&format!("THROUGHPUT: operator {line}"));
        }
        // And the applies alone: as many GpuMachines with no operator to place them.
        op.kill();
        // The same writes the operator makes, made by a plain client with nothing to
        // decide: the API server's own limit for this work.
        let placed = env.machines().list(&ListParams::default()).await?.items;
        let secs = replay_writes(&env, &placed, 64).await?.as_secs_f64();
        note(&format!(
            "THROUGHPUT: API server alone: the operator's writes for {} machines (apply, finalizer, status, Pod, Event; 64 machines at a time, no operator) in {secs:.1} s: {:.1} machines/s",
            placed.len(),
            f64::from(u32::try_from(placed.len()).unwrap_or(u32::MAX)) / secs
        ));
        let more: Vec<GpuMachine> = (0..machines_count)
            .map(|i| env.machine(&format!("b{i:05}"), "h100-80gb", 1))
            .collect();
        let started = Instant::now();
        bench::apply_timed(&env, &more, 16).await?;
        let secs = started.elapsed().as_secs_f64();
        note(&format!(
            "THROUGHPUT: API server alone: {machines_count} GpuMachines applied (16 at a time, no operator) in {secs:.1} s: {:.1} applies/s",
            f64::from(u32::try_from(machines_count).unwrap_or(u32::MAX)) / secs
        ));
        Ok(())
    }
    .await;
    env.finish(result, &mut [&mut op]).await
}

/// Makes, for a copy of each placed machine, the writes the operator made for it (the
/// user's apply, the finalizer, the status with its allocation, the Pod, the `Scheduled`
/// Event), one machine after another `parallel` at a time, and returns how long it took.
async fn replay_writes(
    env: &TestEnv,
    placed: &[GpuMachine],
    parallel: usize,
) -> anyhow::Result<Duration> {
    use futures::{StreamExt as _, TryStreamExt as _};
    use kube::api::PostParams;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let machines = env.machines();
    let pods = env.pods();
    let recorder = Recorder::new(env.client.clone(), Reporter::from("e2e-replay"));
    let started = Instant::now();
    futures::stream::iter(placed.iter().enumerate().map(|(i, original)| {
        let (machines, pods, recorder) = (machines.clone(), pods.clone(), recorder.clone());
        async move {
            let mut copy = env.machine(&format!("r{i:05}"), "h100-80gb", 1);
            copy.spec = original.spec.clone();
            let applied = env.apply(&copy).await?;
            let finalizer = json!({"metadata": {
                "finalizers": [keys::FINALIZER],
                "resourceVersion": applied.resource_version(),
            }});
            let mut written = machines
                .patch(
                    &applied.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&finalizer),
                )
                .await?;
            written.status = original.status.clone();
            written.metadata.managed_fields = None;
            let written = machines
                .replace_status(&written.name_any(), &PostParams::default(), &written)
                .await?;
            let pod = gpuvm_operator::pod::build_pod(&written)?;
            pods.create(&PostParams::default(), &pod).await?;
            let event = Event {
                type_: EventType::Normal,
                reason: "Scheduled".to_owned(),
                note: written.status.as_ref().and_then(|s| s.message.clone()),
                action: "Reconcile".to_owned(),
                secondary: None,
            };
            recorder.publish(&event, &written.object_ref(&())).await?;
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(parallel)
    .try_collect::<Vec<_>>()
    .await?;
    Ok(started.elapsed())
}
