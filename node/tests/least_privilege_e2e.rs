//! The real `gpuvm-node` binary with the chart's least privilege, against a real
//! kube-apiserver (the `gpuvm-e2e` harness): the chart's node ClusterRole and admission
//! policies (`charts/gpuvm/templates/{node-rbac,admission}.yaml`, applied as the files
//! are) and a service-account token bound to the agent's Pod on node A, as the DaemonSet
//! mounts it.
//!
//! Checked: one pass as node A publishes GpuNode A, labels Node A and reports the GPU
//! check of a Pod on node A, while the record of a Pod on node B is refused; the same
//! token run as `--node-name B` (a compromised agent claiming another node) fails and
//! leaves GpuNode B and Node B untouched. Without an API server: `SKIPPED: <reason>`
//! (a failure when `GPUVM_REQUIRE` names `apiserver`).

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use gpuvm_api::GpuNode;
use gpuvm_api::keys::{ANNOTATION_GPU_CHECK, LABEL_GPU_COUNT, LABEL_GPU_MODEL};
use gpuvm_e2e::chart::{NODE_SERVICE_ACCOUNT, RELEASE_NAMESPACE, apply_objects, template_objects};
use gpuvm_e2e::cluster::create_namespace;
use gpuvm_e2e::fixtures::{gpu_node, node};
use gpuvm_e2e::tokens::{service_account_token, write_token_kubeconfig};
use gpuvm_e2e::{HostKind, TestEnv, eventually};
use gpuvm_pci::testing::presets;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_gpuvm-node");

/// A Pod on `node` (bound at creation, as after scheduling).
fn pod_on(name: &str, node: &str, service_account: Option<&str>) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "automountServiceAccountToken": false,
            "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}],
        }
    }))?)
}

/// One `gpuvm-node --once` pass as `node_name`, with the kubeconfig at `kubeconfig`.
fn run_once(kubeconfig: &Path, node_name: &str, work: &Path) -> anyhow::Result<Output> {
    let fake = presets::hgx_h100_8gpu().build()?;
    let path = |p: &Path| {
        p.to_str()
            .map(str::to_owned)
            .context("a non-UTF-8 temp path")
    };
    let health = work.join("health");
    fs::create_dir_all(&health)?;
    Command::new(BIN)
        .args([
            "--once",
            "--node-name",
            node_name,
            "--sysfs-root",
            &path(&fake.sys_root())?,
            "--dev-root",
            &path(&fake.dev_root())?,
            "--health-dir",
            &path(&health)?,
            "--gpu-check-dir",
            &path(&work.join("gpu-check"))?,
            "--log-format",
            "text",
        ])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .env_remove("NODE_NAME")
        .output()
        .context("running gpuvm-node --once")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_a_token_bound_to_node_a_writes_only_node_a() -> anyhow::Result<()> {
    let Some(env) = TestEnv::start("node_least_privilege").await? else {
        return Ok(());
    };
    let result = scenario(&env).await;
    env.cleanup().await;
    result
}

async fn scenario(env: &TestEnv) -> anyhow::Result<()> {
    let admin = env.client.clone();
    let (node_a, node_b) = (format!("{}-a", env.run), format!("{}-b", env.run));
    let nodes: Api<Node> = Api::all(admin.clone());
    let gpu_nodes: Api<GpuNode> = Api::all(admin.clone());
    for name in [&node_a, &node_b] {
        nodes
            .create(
                &PostParams::default(),
                &node(name, HostKind::L40sWorkstation, &env.run),
            )
            .await
            .with_context(|| format!("creating Node {name}"))?;
    }
    // Node B already has a GpuNode (published by its own agent): A must not touch it.
    gpu_nodes
        .create(&PostParams::default(), &gpu_node(&node_b))
        .await
        .context("creating GpuNode B")?;

    create_namespace(&admin, RELEASE_NAMESPACE).await?;
    apply_objects(&admin, &template_objects("node-rbac.yaml")?).await?;
    apply_objects(&admin, &template_objects("admission.yaml")?).await?;

    // The agent's Pod on node A and a token bound to it.
    let agent_pod = Api::<Pod>::namespaced(admin.clone(), RELEASE_NAMESPACE)
        .create(
            &PostParams::default(),
            &pod_on(
                &format!("gpuvm-node-{node_a}"),
                &node_a,
                Some(NODE_SERVICE_ACCOUNT),
            )?,
        )
        .await
        .context("creating the agent's Pod on node A")?;
    let token = service_account_token(
        &admin,
        RELEASE_NAMESPACE,
        NODE_SERVICE_ACCOUNT,
        Some(&agent_pod),
    )
    .await?;
    let work = tempfile::tempdir()?;
    let kubeconfig = work.path().join("kubeconfig");
    write_token_kubeconfig(env.cp.kubeconfig_path(), &token, &kubeconfig)?;

    // Wait for the node-agent policy: agent A may not label Node B.
    let as_agent = gpuvm_e2e::tokens::token_client(env.cp.kubeconfig_path(), &token).await?;
    let agent_nodes: Api<Node> = Api::all(as_agent);
    eventually(
        "the node-agent policy to be enforced",
        Duration::from_secs(60),
        || {
            let agent_nodes = agent_nodes.clone();
            let node_b = node_b.clone();
            async move {
                let patch = Patch::Merge(json!({"metadata": {"labels": {LABEL_GPU_COUNT: "9"}}}));
                Ok(
                    match agent_nodes
                        .patch(&node_b, &PatchParams::default(), &patch)
                        .await
                    {
                        Err(kube::Error::Api(s)) if s.code == 403 => Ok(()),
                        other => Err(format!("{:?}", other.map(|n| n.name_any()))),
                    },
                )
            }
        },
    )
    .await?;

    // GPU check records for a Pod on each node.
    let pods = env.pods();
    let on_a = pods
        .create(&PostParams::default(), &pod_on("on-a", &node_a, None)?)
        .await?;
    let on_b = pods
        .create(&PostParams::default(), &pod_on("on-b", &node_b, None)?)
        .await?;
    let checks = work.path().join("gpu-check");
    fs::create_dir_all(&checks)?;
    for pod in [&on_a, &on_b] {
        fs::write(
            checks.join(format!("{}_{}", env.namespace, pod.name_any())),
            format!("ok: 1 x l40s\npod-uid: {}\n", pod.uid().unwrap_or_default()),
        )?;
    }

    // One pass as node A: everything of node A is written.
    let out = run_once(&kubeconfig, &node_a, work.path())?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.success(),
        "gpuvm-node --once as node A failed:\n{log}"
    );
    let published = gpu_nodes.get(&node_a).await.context("GpuNode A")?;
    let status = published.status.context("GpuNode A has no status")?;
    ensure!(
        status.gpu_count == 8 && status.heartbeat.is_some(),
        "{status:?}"
    );
    let labels = nodes.get(&node_a).await?.labels().clone();
    ensure!(
        labels.get(LABEL_GPU_MODEL).map(String::as_str) == Some("h100-80gb")
            && labels.get(LABEL_GPU_COUNT).map(String::as_str) == Some("8"),
        "Node A's labels: {labels:?}"
    );
    let annotated = pods.get("on-a").await?;
    ensure!(
        annotated
            .annotations()
            .get(ANNOTATION_GPU_CHECK)
            .map(String::as_str)
            == Some("ok: 1 x l40s"),
        "Pod on A: {:?}\n{log}",
        annotated.annotations()
    );
    // The record of the Pod on node B was refused (logged, retried next pass).
    let untouched = pods.get("on-b").await?;
    ensure!(
        !untouched.annotations().contains_key(ANNOTATION_GPU_CHECK),
        "agent A annotated the Pod on node B: {:?}",
        untouched.annotations()
    );
    ensure!(
        log.contains("may only annotate Pods on that node") || log.contains("may not change it"),
        "the refusal is not in the agent's log:\n{log}"
    );

    // The same token claiming node B: refused, node B untouched.
    let before_b = gpu_nodes.get(&node_b).await?;
    let labels_b = nodes.get(&node_b).await?.labels().clone();
    let out = run_once(&kubeconfig, &node_b, work.path())?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success(),
        "gpuvm-node --once as node B with node A's token succeeded:\n{log}"
    );
    ensure!(
        log.contains(&format!("may only create and publish GpuNode {node_a}")),
        "the refusal is not in the agent's log:\n{log}"
    );
    let after_b = gpu_nodes.get(&node_b).await?;
    ensure!(
        after_b.status == before_b.status
            && after_b.metadata.resource_version == before_b.metadata.resource_version,
        "GpuNode B changed: {:?}",
        after_b.status
    );
    ensure!(
        nodes.get(&node_b).await?.labels() == &labels_b,
        "Node B's labels changed"
    );
    Ok(())
}
