//! A GpuMachine's volumes, volume mounts, `envFrom` and `env[].valueFrom` against a real
//! kube-apiserver: the CRD's CEL rules refuse what a GpuMachine may not use (a
//! `hostPath`, a mount of an undeclared volume, ...), and the operator carries what it
//! may use into the machine's Pod field by field, as the API server stores it, without
//! mistaking the API server's defaults for a spec change; a changed volume rolls out a
//! new Pod. Every test prints `SKIPPED: <reason>` and passes when no API server is
//! configured (it fails instead under `GPUVM_REQUIRE=apiserver`).

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use gpuvm_api::keys;
use gpuvm_e2e::{HostKind, OperatorOptions, TestEnv, note};
use gpuvm_operator::pod::{reflects_spec, spec_digest};
use k8s_openapi::api::core::v1::{Pod, Volume};
use kube::ResourceExt as _;
use serde_json::{Value, json};

/// How long anything the operator does on its own may take.
const T: Duration = Duration::from_secs(60);

/// The test's machine as a manifest: an inference server reading its model from a
/// claim, its token from a Secret and its settings from a ConfigMap.
fn inference_server(env: &TestEnv, name: &str) -> anyhow::Result<Value> {
    let mut manifest = serde_json::to_value(env.machine(name, "l40s", 1))?;
    let spec = &mut manifest["spec"];
    spec["env"] = json!([
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "MODEL_DIR", "value": "/models"},
    ]);
    spec["envFrom"] = json!([{"configMapRef": {"name": "server-settings"}, "prefix": "VLLM_"}]);
    spec["volumes"] = json!([
        {"name": "models", "persistentVolumeClaim": {"claimName": "llama-3-8b", "readOnly": true}},
        {"name": "tls", "secret": {"secretName": "server-tls"}},
        {"name": "scratch", "emptyDir": {"sizeLimit": "8Gi"}},
    ]);
    spec["volumeMounts"] = json!([
        {"name": "models", "mountPath": "/models", "readOnly": true},
        {"name": "tls", "mountPath": "/etc/tls", "subPath": "certs"},
        {"name": "scratch", "mountPath": "/scratch"},
    ]);
    Ok(manifest)
}

fn volume<'a>(pod: &'a Pod, name: &str) -> anyhow::Result<&'a Volume> {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|v| v.iter().find(|v| v.name == name))
        .with_context(|| format!("the Pod has no volume {name}"))
}

/// Checks the Pod field by field against [`inference_server`].
fn check_pod(pod: &Pod, claim: &str) -> anyhow::Result<()> {
    let spec = pod.spec.as_ref().context("the Pod has no spec")?;
    let pvc = volume(pod, "models")?
        .persistent_volume_claim
        .as_ref()
        .context("models is not a claim")?;
    ensure!(
        pvc.claim_name == claim && pvc.read_only == Some(true),
        "models: {pvc:?}"
    );
    let tls = volume(pod, "tls")?
        .secret
        .as_ref()
        .context("tls is not a Secret")?;
    ensure!(
        tls.secret_name.as_deref() == Some("server-tls"),
        "tls: {tls:?}"
    );
    let scratch = volume(pod, "scratch")?
        .empty_dir
        .as_ref()
        .context("no emptyDir")?;
    ensure!(
        scratch.size_limit.as_ref().map(|q| q.0.as_str()) == Some("8Gi"),
        "scratch: {scratch:?}"
    );
    let c = spec
        .containers
        .first()
        .context("the Pod has no container")?;
    let mounts = c.volume_mounts.as_deref().unwrap_or_default();
    let seen: Vec<(&str, &str, Option<bool>, Option<&str>)> = mounts
        .iter()
        .map(|m| {
            (
                m.name.as_str(),
                m.mount_path.as_str(),
                m.read_only,
                m.sub_path.as_deref(),
            )
        })
        .collect();
    ensure!(
        seen == [
            ("models", "/models", Some(true), None),
            ("tls", "/etc/tls", None, Some("certs")),
            ("scratch", "/scratch", None, None),
        ],
        "volumeMounts {seen:?}"
    );
    let env = c.env.as_deref().unwrap_or_default();
    let token = env
        .iter()
        .find(|e| e.name == "HF_TOKEN")
        .context("no HF_TOKEN")?;
    let key = token
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .context("HF_TOKEN is not from a Secret")?;
    ensure!(
        key.name == "hf-token" && key.key == "token" && token.value.is_none(),
        "HF_TOKEN {token:?}"
    );
    let field = env
        .iter()
        .find(|e| e.name == "POD_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .context("POD_NAME is not from a field")?;
    ensure!(field.field_path == "metadata.name", "POD_NAME {field:?}");
    let dir = env.iter().find(|e| e.name == "MODEL_DIR");
    ensure!(
        dir.and_then(|e| e.value.as_deref()) == Some("/models"),
        "MODEL_DIR {dir:?}"
    );
    let from = c.env_from.as_deref().unwrap_or_default();
    ensure!(
        from.len() == 1
            && from[0].prefix.as_deref() == Some("VLLM_")
            && from[0].config_map_ref.as_ref().map(|r| r.name.as_str()) == Some("server-settings"),
        "envFrom {from:?}"
    );
    ensure!(
        spec.automount_service_account_token == Some(false),
        "the VM must get no API token"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_carries_the_machines_volumes_and_env_sources_and_rolls_out_their_changes()
-> anyhow::Result<()> {
    let Some(mut env) = TestEnv::start("volumes").await? else {
        return Ok(());
    };
    env.add_hosts(HostKind::L40sWorkstation, 1).await?;
    let mut op = env
        .start_operator(OperatorOptions::single(&env.namespace))
        .await?;
    let result = async {
        let mut manifest = inference_server(&env, "server")?;
        let applied = env.apply_json("server", &manifest).await?;
        let pod = env.wait_pod("server-vm", T).await?;
        check_pod(&pod, "llama-3-8b")?;
        ensure!(
            pod.annotations().get(keys::ANNOTATION_SPEC_DIGEST)
                == Some(&spec_digest(&applied.spec)),
            "digest annotation {:?}",
            pod.annotations().get(keys::ANNOTATION_SPEC_DIGEST)
        );
        // The Pod as stored carries the API server's defaults (a Secret volume's
        // defaultMode, a fieldRef's apiVersion): still the machine's spec.
        let stored_mode = volume(&pod, "tls")?
            .secret
            .as_ref()
            .and_then(|s| s.default_mode);
        note(&format!(
            "e2e: volumes: the stored Secret volume has defaultMode {stored_mode:?}"
        ));
        ensure!(
            reflects_spec(&pod, &applied.spec),
            "the stored Pod does not reflect its spec"
        );
        env.wait_generation_observed("server", T).await?;
        // No roll-out follows: the same Pod, still index 0, a few reconciles later.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let again = env.machines().get("server").await?;
        let status = again.status.clone().unwrap_or_default();
        ensure!(
            status.pod_index == 0 && env.pods().get_opt("server-vm-1").await?.is_none(),
            "an unchanged spec rolled out: {status:?}"
        );

        // Another model: a new Pod with the new claim.
        manifest["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = json!("mistral-7b");
        env.apply_json("server", &manifest).await?;
        let next = env.wait_pod("server-vm-1", T).await?;
        check_pod(&next, "mistral-7b")?;
        let rolled = env.machines().get("server").await?;
        let message = rolled.status.and_then(|s| s.message).unwrap_or_default();
        note(&format!("e2e: volumes: after the claim changed: {message}"));
        ensure!(
            env.pods()
                .get_opt("server-vm")
                .await?
                .is_none_or(|p| p.metadata.deletion_timestamp.is_some()),
            "the Pod of the old claim is still there"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_refuses_what_a_machine_may_not_take_from_its_node_or_namespace()
-> anyhow::Result<()> {
    let Some(env) = TestEnv::start("volume-rules").await? else {
        return Ok(());
    };
    // No operator here: the API server alone validates.
    let base = inference_server(&env, "valid")?;
    env.apply_json("valid", &base).await.context(
        "a machine with a claim, a Secret, a ConfigMap and an emptyDir must be accepted",
    )?;
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit, &str); 11] = [
        (
            "host-path",
            |s| s["volumes"][1] = json!({"name": "tls", "hostPath": {"path": "/etc/kubernetes"}}),
            "volume tls: hostPath volumes are not allowed in a GpuMachine",
        ),
        (
            "nfs",
            |s| {
                s["volumes"][1] = json!({"name": "tls", "nfs": {"server": "10.0.0.1", "path": "/"}})
            },
            "volume tls: nfs volumes are not allowed in a GpuMachine",
        ),
        (
            "two-types",
            |s| s["volumes"][2]["secret"] = json!({"secretName": "x"}),
            "a volume has exactly one type",
        ),
        (
            "token",
            |s| {
                s["volumes"][1] = json!({"name": "tls", "projected": {"sources": [
                    {"serviceAccountToken": {"path": "token"}}]}})
            },
            "may not project a service-account token",
        ),
        (
            "undeclared",
            |s| s["volumeMounts"][1]["name"] = json!("cache"),
            "every spec.volumeMounts entry must name a volume declared in spec.volumes",
        ),
        (
            "relative-mount",
            |s| s["volumeMounts"][1]["mountPath"] = json!("etc/tls"),
            "mountPath must be an absolute path without '..'",
        ),
        (
            "dot-dot-mount",
            |s| s["volumeMounts"][1]["mountPath"] = json!("/etc/../root"),
            "mountPath must be an absolute path without '..'",
        ),
        (
            "dot-dot-sub-path",
            |s| s["volumeMounts"][1]["subPath"] = json!("certs/../.."),
            "subPath must be a relative path without '..'",
        ),
        (
            "value-and-value-from",
            |s| s["env"][0]["value"] = json!("literal"),
            "an env entry sets value or valueFrom, not both",
        ),
        (
            "bidirectional",
            |s| s["volumeMounts"][0]["mountPropagation"] = json!("Bidirectional"),
            "mountPropagation cannot be Bidirectional",
        ),
        (
            "env-from-both",
            |s| s["envFrom"][0]["secretRef"] = json!({"name": "hf-token"}),
            "an envFrom entry names exactly one of configMapRef or secretRef",
        ),
    ];
    let mut failures = Vec::new();
    for (name, edit, want) in cases {
        let mut manifest = base.clone();
        manifest["metadata"]["name"] = json!(name);
        edit(&mut manifest["spec"]);
        if let Err(failure) = env.expect_invalid(name, &manifest, want).await {
            failures.push(failure);
        }
    }
    // A change of an existing machine is held to the same rules.
    let mut changed = base.clone();
    changed["spec"]["volumes"][2] = json!({"name": "scratch", "hostPath": {"path": "/"}});
    match env.apply_rejected("valid", &changed).await {
        Ok(status) if status.message.contains("hostPath") => {}
        Ok(status) => failures.push(format!("update to hostPath: {:?}", status.message)),
        Err(e) => failures.push(format!("update to hostPath: {e:#}")),
    }
    ensure!(
        failures.is_empty(),
        "validation:\n  {}",
        failures.join("\n  ")
    );
    env.cleanup().await;
    Ok(())
}
