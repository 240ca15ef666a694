//! The GPU check records → Pod annotation + Event, against a real kube-apiserver (the
//! `gpuvm-e2e` harness: `KUBECONFIG`, or `KUBEBUILDER_ASSETS` / `KUBE_APISERVER` +
//! `ETCD`). Without an API server it prints `SKIPPED: <reason>` and passes, or fails when
//! `GPUVM_REQUIRE` names `apiserver` (`gpuvm-testkit`).
//!
//! Checked: an `ok` record sets the Pod's `gpuvm.dev/gpu-check`; a `failed` one sets it
//! and emits a Warning Event on the Pod; an unchanged record does nothing; a record
//! whose Pod is gone, or that names an older Pod's UID, is removed.

use std::fs;

use anyhow::{Context as _, ensure};
use gpuvm_api::keys::ANNOTATION_GPU_CHECK;
use gpuvm_e2e::TestEnv;
use gpuvm_node::gpu_check::{EVENT_REASON_FAILED, report_gpu_checks};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt as _;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use serde_json::json;

async fn create_pod(pods: &Api<Pod>, name: &str) -> anyhow::Result<Pod> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))?;
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating Pod {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_check_records_reach_their_pods() -> anyhow::Result<()> {
    let test = "node_gpu_check";
    // Prints `SKIPPED: <test>: ...`, or fails when GPUVM_REQUIRE names `apiserver`.
    let Some(env) = TestEnv::start(test).await? else {
        return Ok(());
    };
    let result = scenario(&env).await;
    env.cleanup().await;
    result
}

async fn scenario(env: &TestEnv) -> anyhow::Result<()> {
    let ns = &env.namespace;
    let pods = env.pods();
    let good = create_pod(&pods, "good").await?;
    let bad = create_pod(&pods, "bad").await?;
    let dir = tempfile::tempdir()?;
    let uid = |p: &Pod| p.uid().unwrap_or_default();
    fs::write(
        dir.path().join(format!("{ns}_good")),
        format!("ok: 2 x h100-80gb\npod-uid: {}\n", uid(&good)),
    )?;
    fs::write(
        dir.path().join(format!("{ns}_bad")),
        format!(
            "failed: no NVIDIA driver in the guest\npod-uid: {}\n",
            uid(&bad)
        ),
    )?;
    fs::write(dir.path().join(format!("{ns}_gone")), "ok: 1 x l4\n")?;
    fs::write(
        dir.path().join(format!("{ns}_stale")),
        "ok: 1 x l4\npod-uid: not-this-one\n",
    )?;
    create_pod(&pods, "stale").await?;

    let recorder = Recorder::new(
        env.client.clone(),
        Reporter {
            controller: "gpuvm-node".into(),
            instance: Some("e2e".into()),
        },
    );
    let actions = report_gpu_checks(&env.client, &recorder, dir.path()).await?;
    ensure!(
        actions == 4,
        "4 actions (2 annotations, 2 removals), got {actions}"
    );

    let good = pods.get("good").await?;
    ensure!(
        good.annotations()
            .get(ANNOTATION_GPU_CHECK)
            .map(String::as_str)
            == Some("ok: 2 x h100-80gb"),
        "good Pod annotated: {:?}",
        good.annotations()
    );
    let bad = pods.get("bad").await?;
    ensure!(
        bad.annotations()
            .get(ANNOTATION_GPU_CHECK)
            .map(String::as_str)
            == Some("failed: no NVIDIA driver in the guest"),
        "bad Pod annotated: {:?}",
        bad.annotations()
    );
    let stale = pods.get("stale").await?;
    ensure!(
        !stale.annotations().contains_key(ANNOTATION_GPU_CHECK),
        "a record of another Pod's UID is not applied"
    );
    ensure!(
        !dir.path().join(format!("{ns}_gone")).exists(),
        "gone Pod's record removed"
    );
    ensure!(
        !dir.path().join(format!("{ns}_stale")).exists(),
        "stale record removed"
    );

    let events: Api<Event> = Api::namespaced(env.client.clone(), ns);
    let list = events.list(&ListParams::default()).await?;
    ensure!(
        list.items.iter().any(|e| {
            e.reason.as_deref() == Some(EVENT_REASON_FAILED)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("bad")
                && e.note.as_deref() == Some("no NVIDIA driver in the guest")
        }),
        "a Warning Event on the bad Pod"
    );

    // Nothing changed: nothing to do.
    let again = report_gpu_checks(&env.client, &recorder, dir.path()).await?;
    ensure!(again == 0, "unchanged records need no action, got {again}");
    Ok(())
}
