//! The real `gpuvm-node` binary against a real kube-apiserver (the `gpuvm-e2e` harness:
//! `KUBECONFIG`, or `KUBEBUILDER_ASSETS` / `KUBE_APISERVER` + `ETCD`), on a fake sysfs
//! tree. Without an API server each test prints `SKIPPED: <reason>` and passes, or fails
//! when `GPUVM_REQUIRE` names `apiserver` (`gpuvm-testkit`).
//!
//! Checked: the GpuNode is created and its status published (heartbeat, devices) under
//! field manager `gpuvm-node`; the Node gets its labels and keeps the others; a GPU
//! vanishing from the bus and a reset-failure record show up as `healthy: false` after a
//! SIGHUP; the operator's own view (`node_views` + `place_machine`) places nothing on the
//! board for its NVSwitches (`FabricManagerUnavailable`) and, those set aside, stops
//! placing on the unhealthy GPUs; SIGTERM ends the agent cleanly; `--once` keeps an administrator's
//! `spec.unschedulable`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use gpuvm_api::keys::{LABEL_GPU_COUNT, LABEL_GPU_MODEL, LABEL_GPU_NODE};
use gpuvm_api::{GpuNode, PlacementStrategy};
use gpuvm_e2e::cluster::apply_crds;
use gpuvm_e2e::fixtures::{LABEL_RUN, node_ready_patch};
use gpuvm_e2e::{Check, TestEnv, eventually};
use gpuvm_operator::inventory::node_views;
use gpuvm_operator::scheduler::{NodeView, PlacementRequest, place_machine};
use gpuvm_pci::testing::{FakeSysfs, presets};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{CustomResourceExt as _, ResourceExt as _};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_gpuvm-node");
const WAIT: Duration = Duration::from_secs(60);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(120);

/// The agent as a child process; killed on drop, so a failing test leaves nothing behind.
struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts the agent for node `name` on `fake`, with its health records in `health`
    /// and its log in `dir`, plus `extra` arguments.
    fn start(
        env: &TestEnv,
        name: &str,
        fake: &FakeSysfs,
        health: &Path,
        extra: &[&str],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let (sys, dev) = (fake.sys_root(), fake.dev_root());
        let args = [
            "--node-name",
            name,
            "--sysfs-root",
            path_arg(&sys)?,
            "--dev-root",
            path_arg(&dev)?,
            "--health-dir",
            path_arg(health)?,
        ];
        let log = dir.join("gpuvm-node.log");
        let stderr = fs::File::create(&log).context("creating the agent's log")?;
        let child = Command::new(BIN)
            .args(args)
            .args(extra)
            .env("KUBECONFIG", env.cp.kubeconfig_path())
            .env("RUST_LOG", "info,gpuvm_node=debug")
            .env_remove("NODE_NAME")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting gpuvm-node")?;
        Ok(Self { child, log })
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = i32::try_from(self.child.id()).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal).with_context(|| format!("sending {signal}"))
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits for the process to exit, up to `timeout`.
    fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for gpuvm-node")? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("gpuvm-node still running after {} s", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // Best effort: it may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn path_arg(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("a non-UTF-8 temp path")
}

/// Runs `gpuvm-node --once --no-bind` for node `name` on `fake`, with its log and
/// health records in `work`; fails unless it exits 0.
fn run_agent_once(env: &TestEnv, name: &str, fake: &FakeSysfs, work: &Path) -> anyhow::Result<()> {
    let health = work.join("health");
    let extra = ["--once", "--no-bind"];
    let mut agent = AgentProcess::start(env, name, fake, &health, &extra, work)?;
    let exit = agent.wait(WAIT)?;
    ensure!(
        exit.success(),
        "--once exited with {exit}:\n{}",
        agent.log_tail()
    );
    Ok(())
}

/// A bare Node for the test run (no gpuvm labels but a stale model), Ready.
async fn create_node(env: &TestEnv, name: &str) -> anyhow::Result<Api<Node>> {
    let nodes: Api<Node> = Api::all(env.client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([
                (LABEL_RUN.to_owned(), env.run.clone()),
                ("example.com/keep".to_owned(), "yes".to_owned()),
                (LABEL_GPU_MODEL.to_owned(), "stale".to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    nodes
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("creating Node {name}"))?;
    mark_ready(&nodes, name).await?;
    Ok(nodes)
}

async fn mark_ready(nodes: &Api<Node>, name: &str) -> anyhow::Result<()> {
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(node_ready_patch()),
        )
        .await
        .with_context(|| format!("marking Node {name} Ready"))?;
    Ok(())
}

/// Best-effort removal of what a test made (a loopback control plane is thrown away
/// anyway; an existing cluster keeps what is not deleted).
async fn remove(env: &TestEnv, name: &str) {
    let nodes: Api<Node> = Api::all(env.client.clone());
    let gpu_nodes: Api<GpuNode> = Api::all(env.client.clone());
    let _ = nodes.delete(name, &DeleteParams::default()).await;
    let _ = gpu_nodes.delete(name, &DeleteParams::default()).await;
}

/// Polls the GpuNode until `check` accepts it.
async fn wait_gpu_node<F>(
    env: &TestEnv,
    name: &str,
    what: &str,
    check: F,
) -> anyhow::Result<GpuNode>
where
    F: Fn(&GpuNode) -> Check<()>,
{
    let api: Api<GpuNode> = Api::all(env.client.clone());
    eventually(what, WAIT, || {
        let api = api.clone();
        let check = &check;
        async move {
            Ok(match api.get_opt(name).await? {
                None => Err("no GpuNode yet".to_owned()),
                Some(gn) => check(&gn).map(|()| gn),
            })
        }
    })
    .await
}

fn device_health(gn: &GpuNode, address: &str) -> Option<(bool, String)> {
    gn.status
        .as_ref()?
        .devices
        .iter()
        .find(|d| d.pci_address == address)
        .map(|d| (d.healthy, d.reason.clone().unwrap_or_default()))
}

fn counts(gn: &GpuNode) -> (i32, i32) {
    gn.status
        .as_ref()
        .map_or((0, 0), |s| (s.gpu_count, s.healthy_count))
}

/// The operator's view of the node with its NVSwitches set aside, as if their fabric
/// were managed: what placement then sees is the GPUs' health. (The NVSwitches
/// themselves keep every machine off, checked once in the scenario.)
fn views_past_the_fabric(gn: &GpuNode, node: &Node) -> Vec<NodeView> {
    let mut views = node_views([gn], [node], Timestamp::now(), HEARTBEAT_TIMEOUT);
    for view in &mut views {
        view.nvswitches.clear();
    }
    views
}

fn request(run: &str, count: u32) -> PlacementRequest {
    PlacementRequest {
        model: "h100-80gb".to_owned(),
        count,
        node_selector: BTreeMap::from([(LABEL_RUN.to_owned(), run.to_owned())]),
        strategy: PlacementStrategy::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_publishes_inventory_labels_and_health_changes() -> anyhow::Result<()> {
    let test = "node_agent_publishes";
    // Prints `SKIPPED: <test>: ...`, or fails when GPUVM_REQUIRE names `apiserver`.
    let Some(env) = TestEnv::start(test).await? else {
        return Ok(());
    };
    let name = format!("{}-hgx", env.run);
    let result = publishes(&env, &name).await;
    remove(&env, &name).await;
    env.cleanup().await;
    result
}

async fn publishes(env: &TestEnv, name: &str) -> anyhow::Result<()> {
    let nodes = create_node(env, name).await?;
    let fake: FakeSysfs = presets::hgx_h100_8gpu().build()?;
    let work = tempfile::tempdir()?;
    let health = work.path().join("health");
    fs::create_dir_all(&health)?;
    let extra = ["--interval", "3600", "--log-format", "json"];
    let mut agent = AgentProcess::start(env, name, &fake, &health, &extra, work.path())?;
    let outcome = scenario(env, name, &nodes, &fake, &health, &mut agent).await;
    outcome.with_context(|| format!("gpuvm-node's log:\n{}", agent.log_tail()))
}

async fn scenario(
    env: &TestEnv,
    name: &str,
    nodes: &Api<Node>,
    fake: &FakeSysfs,
    health: &Path,
    agent: &mut AgentProcess,
) -> anyhow::Result<()> {
    // 1. The GpuNode: created with spec.nodeName, status published with a heartbeat.
    let gn = wait_gpu_node(env, name, "8 healthy GPUs published", |gn| {
        match counts(gn) {
            (8, 8) => Ok(()),
            seen => Err(format!("(gpuCount, healthyCount) = {seen:?}")),
        }
    })
    .await?;
    ensure!(
        gn.spec.node_name == name,
        "spec.nodeName is {}",
        gn.spec.node_name
    );
    ensure!(!gn.spec.unschedulable);
    let status = gn.status.clone().context("no status")?;
    ensure!(status.iommu_enabled);
    ensure!(
        status.nvswitches.len() == 4
            && status.nvswitch_devices.len() == 4
            && status
                .nvswitch_devices
                .iter()
                .all(|s| s.device_id == "22a3" && s.model == "h100-nvswitch"),
        "{:?}",
        status.nvswitches
    );
    let heartbeat = status.heartbeat.clone().context("no heartbeat")?;
    let age = Timestamp::now().duration_since(heartbeat.0).as_secs_f64();
    ensure!(age.abs() < 60.0, "heartbeat is {age} s old");
    let numa: std::collections::BTreeSet<_> = status.devices.iter().map(|d| d.numa_node).collect();
    ensure!(numa.len() == 2, "NUMA nodes {numa:?}");
    ensure!(status.devices.iter().all(|d| d.model == "h100-80gb"));
    let managers: Vec<(String, Option<String>)> = gn
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| (m.manager.clone().unwrap_or_default(), m.subresource.clone()))
        .collect();
    ensure!(
        managers.contains(&("gpuvm-node".to_owned(), Some("status".to_owned()))),
        "managedFields {managers:?}"
    );

    // 2. The Node's labels: ours set (the stale model overwritten), others kept.
    let node = eventually("the Node's gpuvm labels", WAIT, || async {
        let node = nodes.get(name).await?;
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let ours = (
            labels.get(LABEL_GPU_NODE).cloned(),
            labels.get(LABEL_GPU_MODEL).cloned(),
            labels.get(LABEL_GPU_COUNT).cloned(),
        );
        Ok(
            if ours
                == (
                    Some("true".into()),
                    Some("h100-80gb".into()),
                    Some("8".into()),
                )
            {
                Ok(node)
            } else {
                Err(format!("{ours:?}"))
            },
        )
    })
    .await?;
    let labels = node.metadata.labels.clone().unwrap_or_default();
    ensure!(
        labels.get("example.com/keep").map(String::as_str) == Some("yes"),
        "{labels:?}"
    );
    ensure!(labels.get(LABEL_RUN) == Some(&env.run), "{labels:?}");

    // The operator's view: ready, but the board's NVSwitches keep every machine off it.
    let views = node_views([&gn], [&node], Timestamp::now(), HEARTBEAT_TIMEOUT);
    ensure!(
        views.len() == 1 && views[0].ready && views[0].schedulable,
        "{views:?}"
    );
    let refused = place_machine(&request(&env.run, 1), &views, &BTreeMap::new())
        .err()
        .context("a machine was placed on an NVSwitch board")?;
    ensure!(
        refused.reason() == "FabricManagerUnavailable",
        "{}: {refused}",
        refused.reason()
    );
    // Past the fabric, 8 GPUs are placeable.
    let views = views_past_the_fabric(&gn, &node);
    place_machine(&request(&env.run, 8), &views, &BTreeMap::new())
        .map_err(|e| anyhow::anyhow!("8 GPUs should be placeable: {e:?}"))?;

    // 3. A GPU falls off the bus; SIGHUP rescans at once (the interval is an hour).
    fs::remove_file(fake.sysfs().devices_dir().join("0000:9d:00.0"))?;
    agent.signal(Signal::SIGHUP)?;
    let gn = wait_gpu_node(
        env,
        name,
        "0000:9d:00.0 unhealthy",
        |gn| match device_health(gn, "0000:9d:00.0") {
            Some((false, reason)) if reason == gpuvm_node::REASON_DISAPPEARED => Ok(()),
            seen => Err(format!("{seen:?}")),
        },
    )
    .await?;
    ensure!(counts(&gn) == (8, 7), "{:?}", counts(&gn));
    let node = eventually("gpu.count=7", WAIT, || async {
        let node = nodes.get(name).await?;
        let count = node.labels().get(LABEL_GPU_COUNT).cloned();
        Ok(if count.as_deref() == Some("7") {
            Ok(node)
        } else {
            Err(format!("{count:?}"))
        })
    })
    .await?;
    mark_ready(nodes, name).await?;
    let node = nodes.get(name).await.unwrap_or(node);
    let views = views_past_the_fabric(&gn, &node);
    ensure!(views[0].ready, "{views:?}");
    ensure!(
        views[0]
            .devices
            .iter()
            .any(|d| d.pci_address == "0000:9d:00.0" && !d.healthy),
        "{views:?}"
    );
    ensure!(
        place_machine(&request(&env.run, 8), &views, &BTreeMap::new()).is_err(),
        "8 GPUs placed with one gone"
    );
    let placed = place_machine(&request(&env.run, 7), &views, &BTreeMap::new())
        .map_err(|e| anyhow::anyhow!("7 GPUs should be placeable: {e:?}"))?;
    ensure!(
        !placed.devices().iter().any(|d| d == "0000:9d:00.0"),
        "the vanished GPU was placed: {placed:?}"
    );

    // 4. The shim records a failed reset; the next pass (SIGHUP) marks that GPU too,
    // with a newer heartbeat.
    let before = gn.status.as_ref().and_then(|s| s.heartbeat.clone());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    fs::write(
        health.join("0000:18:00.0"),
        "reset failed: flr: Inappropriate ioctl for device\n",
    )?;
    agent.signal(Signal::SIGHUP)?;
    let gn = wait_gpu_node(
        env,
        name,
        "0000:18:00.0 unhealthy after its reset failed",
        |gn| match device_health(gn, "0000:18:00.0") {
            Some((false, reason)) if reason.contains("the last reset of 0000:18:00.0 failed") => {
                Ok(())
            }
            seen => Err(format!("{seen:?}")),
        },
    )
    .await?;
    ensure!(counts(&gn) == (8, 6), "{:?}", counts(&gn));
    let after = gn.status.as_ref().and_then(|s| s.heartbeat.clone());
    ensure!(
        after.as_ref().map(|t| t.0) > before.as_ref().map(|t| t.0),
        "heartbeat did not advance: {before:?} → {after:?}"
    );
    mark_ready(nodes, name).await?;
    let node = nodes.get(name).await?;
    let views = views_past_the_fabric(&gn, &node);
    ensure!(views[0].ready, "{views:?}");
    ensure!(
        place_machine(&request(&env.run, 7), &views, &BTreeMap::new()).is_err(),
        "7 GPUs placed with two unhealthy"
    );
    let placed = place_machine(&request(&env.run, 6), &views, &BTreeMap::new())
        .map_err(|e| anyhow::anyhow!("6 GPUs should be placeable: {e:?}"))?;
    ensure!(
        !placed
            .devices()
            .iter()
            .any(|d| d == "0000:18:00.0" || d == "0000:9d:00.0"),
        "an unhealthy GPU was placed: {placed:?}"
    );

    // 5. SIGTERM ends it cleanly.
    agent.signal(Signal::SIGTERM)?;
    let exit = agent.wait(Duration::from_secs(15))?;
    ensure!(exit.success(), "gpuvm-node exited with {exit}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_publishes_and_keeps_the_administrators_fields() -> anyhow::Result<()> {
    let test = "node_agent_once";
    // Prints `SKIPPED: <test>: ...`, or fails when GPUVM_REQUIRE names `apiserver`.
    let Some(env) = TestEnv::start(test).await? else {
        return Ok(());
    };
    let name = format!("{}-ws", env.run);
    let result = once(&env, &name).await;
    remove(&env, &name).await;
    env.cleanup().await;
    result
}

async fn once(env: &TestEnv, name: &str) -> anyhow::Result<()> {
    let nodes = create_node(env, name).await?;
    let fake = presets::workstation_l40s().build()?;
    let work = tempfile::tempdir()?;
    let run_once = || run_agent_once(env, name, &fake, work.path());
    run_once()?;

    let gpu_nodes: Api<GpuNode> = Api::all(env.client.clone());
    let gn = gpu_nodes.get(name).await?;
    ensure!(gn.spec.node_name == name);
    ensure!(counts(&gn) == (1, 0), "{:?}", counts(&gn));
    let (healthy, reason) = device_health(&gn, "0000:01:00.0").context("no L40S")?;
    ensure!(
        !healthy && reason.contains("bound to nvidia, not vfio-pci"),
        "{reason}"
    );
    let status = gn.status.clone().context("no status")?;
    let members: Vec<String> = status.devices[0]
        .iommu_group_members
        .iter()
        .map(|m| format!("{}:{:?}", m.pci_address, m.role))
        .collect();
    ensure!(
        members == ["0000:01:00.0:Gpu", "0000:01:00.1:Companion"],
        "{members:?}"
    );
    ensure!(status.heartbeat.is_some());
    ensure!(fake.all_writes()?.is_empty(), "--no-bind wrote to sysfs");
    let labels = nodes.get(name).await?.metadata.labels.unwrap_or_default();
    ensure!(
        labels.get(LABEL_GPU_COUNT).map(String::as_str) == Some("0"),
        "{labels:?}"
    );
    ensure!(
        labels.get(LABEL_GPU_MODEL).map(String::as_str) == Some("l40s"),
        "{labels:?}"
    );

    // An administrator takes the node out of placement; the agent must keep that.
    gpu_nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await?;
    run_once()?;
    let gn = gpu_nodes.get(name).await?;
    ensure!(gn.spec.unschedulable, "spec.unschedulable was reset");
    let node = nodes.get(name).await?;
    let views = views_past_the_fabric(&gn, &node);
    ensure!(views[0].ready && !views[0].schedulable, "{views:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvswitches_stored_as_bare_addresses_still_read_and_the_agent_rewrites_them()
-> anyhow::Result<()> {
    let test = "node_agent_nvswitch_upgrade";
    // Prints `SKIPPED: <test>: ...`, or fails when GPUVM_REQUIRE names `apiserver`.
    let Some(env) = TestEnv::start(test).await? else {
        return Ok(());
    };
    let name = format!("{}-hgx", env.run);
    let result = upgrade(&env, &name).await;
    remove(&env, &name).await;
    // The control plane may be shared: leave it the committed CRDs.
    let restored = apply_crds(&env.client).await;
    env.cleanup().await;
    result.and(restored)
}

/// The GpuNode CRD as it was before `nvswitchDevices`: NVSwitches as bare addresses.
fn crd_before_nvswitch_devices() -> anyhow::Result<CustomResourceDefinition> {
    let mut crd = serde_json::to_value(GpuNode::crd())?;
    let status = crd
        .pointer_mut("/spec/versions/0/schema/openAPIV3Schema/properties/status/properties")
        .and_then(Value::as_object_mut)
        .context("no status properties in the GpuNode schema")?;
    status
        .remove("nvswitchDevices")
        .context("no nvswitchDevices in the GpuNode schema")?;
    Ok(serde_json::from_value(crd)?)
}

/// A GpuNode written by an agent of the old schema, then the CRD upgraded: it still
/// reads, and the current agent's server-side apply over it succeeds. (It did not when
/// `nvswitches` itself changed type from strings to objects: the API server answers
/// 500 to an apply over a stored field of the wrong type.)
async fn upgrade(env: &TestEnv, name: &str) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let old = crd_before_nvswitch_devices()?;
    crds.patch(
        &old.name_any(),
        &PatchParams::apply("gpuvm-e2e-old-crd").force(),
        &Patch::Apply(&old),
    )
    .await
    .context("applying the old GpuNode CRD")?;
    let nodes = create_node(env, name).await?;
    let gpu_nodes: Api<GpuNode> = Api::all(env.client.clone());
    gpu_nodes
        .create(&PostParams::default(), &gpuvm_e2e::fixtures::gpu_node(name))
        .await?;
    let old_status = json!({"status": {"iommuEnabled": true, "nvswitches": ["0000:06:00.0"]}});
    // The API server takes a moment to serve the old schema.
    eventually("the old agent's status to be stored", WAIT, || async {
        Ok(
            match gpu_nodes
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&old_status))
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => Err(e.to_string()),
            },
        )
    })
    .await?;

    apply_crds(&env.client).await?;
    let stored = gpu_nodes
        .get(name)
        .await
        .context("reading the old GpuNode")?;
    let switches = stored.status.unwrap_or_default().all_nvswitches();
    ensure!(
        switches.len() == 1
            && switches[0].pci_address == "0000:06:00.0"
            && switches[0].device_id.is_empty(),
        "{switches:?}"
    );

    let fake = presets::hgx_h100_8gpu().build()?;
    let work = tempfile::tempdir()?;
    run_agent_once(env, name, &fake, work.path()).context("over the old object")?;
    let gn = gpu_nodes.get(name).await?;
    let status = gn.status.unwrap_or_default();
    ensure!(
        status.nvswitches == presets::HGX_H100_NVSWITCHES,
        "{:?}",
        status.nvswitches
    );
    let ids: Vec<(&str, &str)> = status
        .nvswitch_devices
        .iter()
        .map(|s| (s.pci_address.as_str(), s.device_id.as_str()))
        .collect();
    ensure!(
        ids == presets::HGX_H100_NVSWITCHES.map(|a| (a, "22a3")),
        "{ids:?}"
    );
    ensure!(nodes.get(name).await.is_ok());
    Ok(())
}
