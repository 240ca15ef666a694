//! The chart's admission policies (`charts/gpuvm/templates/admission.yaml`, applied as
//! the file is, see `gpuvm_e2e::chart`) against a real kube-apiserver, with real
//! service-account tokens from the TokenRequest API:
//!
//! - only the operator's service account creates a gpuvm Pod, and only with the devices
//!   the node's GpuAllocation gives to the Pod's GpuMachine (the Pod is the operator's
//!   own `build_pod`);
//! - nobody (cluster-admin included) changes a gpuvm Pod's gpuvm.dev/ annotations or
//!   labels afterwards, except gpu-check by the node agent of the Pod's node, and a
//!   gpuvm Pod is not resized in place;
//! - the node agent, with the chart's ClusterRole and a token bound to its Pod on node
//!   A, writes its own Node's labels, GpuNode, Pods and Events, and nothing of node B.
//!
//! Without an API server each test prints `SKIPPED: <reason>` (a failure when
//! `GPUVM_REQUIRE` names `apiserver`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use gpuvm_api::allocation::{GpuAllocationSpec, MachineRef};
use gpuvm_api::{AllocatedGpu, GpuAllocation, GpuMachine, GpuMachineStatus, GpuNode, keys};
use gpuvm_e2e::chart::{
    NODE_SERVICE_ACCOUNT, OPERATOR_SERVICE_ACCOUNT, RELEASE_NAMESPACE, apply_objects,
    template_objects,
};
use gpuvm_e2e::cluster::create_namespace;
use gpuvm_e2e::fixtures::{L40S_AUDIO, L40S_GPU, gpu_node};
use gpuvm_e2e::tokens::{
    ensure_service_account, service_account_token, token_client, write_token_kubeconfig,
};
use gpuvm_e2e::{HostKind, Operator, OperatorOptions, TestEnv, eventually, note};
use gpuvm_operator::pod::build_pod;
use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec};
use k8s_openapi::api::rbac::v1::{
    ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};

/// How long a new policy or binding may take to be enforced.
const ACTIVE: Duration = Duration::from_secs(60);
/// The tenant's ServiceAccount, in the test's namespace.
const TENANT: &str = "tenant";

/// Everything a test needs: two L40S nodes, the chart's policies and node RBAC, a
/// machine on each node with its allocation record, and clients for the operator and
/// a tenant.
struct Setup {
    env: TestEnv,
    node_a: String,
    node_b: String,
    /// Placed on `node_a` (its status set here as the operator would mirror it).
    machine_a: GpuMachine,
    /// Placed on `node_b`.
    machine_b: GpuMachine,
    operator: Client,
    tenant: Client,
}

impl Setup {
    async fn start(test: &str) -> anyhow::Result<Option<Setup>> {
        let Some(mut env) = TestEnv::start(test).await? else {
            return Ok(None);
        };
        let admin = env.client.clone();
        let nodes = env.add_hosts(HostKind::L40sWorkstation, 2).await?;
        let (node_a, node_b) = (nodes[0].clone(), nodes[1].clone());

        create_namespace(&admin, RELEASE_NAMESPACE).await?;
        ensure_service_account(&admin, RELEASE_NAMESPACE, OPERATOR_SERVICE_ACCOUNT).await?;
        ensure_service_account(&admin, &env.namespace, TENANT).await?;
        // The chart's node agent identity and ClusterRole, and its admission policies.
        apply_objects(&admin, &template_objects("node-rbac.yaml")?).await?;
        apply_objects(&admin, &template_objects("admission.yaml")?).await?;
        // The operator's and the tenant's rights on Pods of the test's namespace (the
        // operator's own ClusterRole is wider; these are what the test exercises).
        grant(
            &admin,
            &env.namespace,
            "operator-pods",
            RELEASE_NAMESPACE,
            OPERATOR_SERVICE_ACCOUNT,
            vec![rule(&["pods"], &["create", "get", "delete"])],
        )
        .await?;
        grant(
            &admin,
            &env.namespace,
            "tenant-pods",
            &env.namespace,
            TENANT,
            vec![
                rule(&["pods"], &["create", "get", "update", "patch"]),
                rule(&["pods/status", "pods/resize"], &["update", "patch"]),
            ],
        )
        .await?;

        let machine_a = placed(&env, "train-a", &node_a).await?;
        let machine_b = placed(&env, "train-b", &node_b).await?;

        let kubeconfig = env.cp.kubeconfig_path().to_owned();
        let token =
            service_account_token(&admin, RELEASE_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, None)
                .await?;
        let operator = token_client(&kubeconfig, &token).await?;
        let token = service_account_token(&admin, &env.namespace, TENANT, None).await?;
        let tenant = token_client(&kubeconfig, &token).await?;
        Ok(Some(Setup {
            env,
            node_a,
            node_b,
            machine_a,
            machine_b,
            operator,
            tenant,
        }))
    }

    fn pods(&self, client: &Client) -> Api<Pod> {
        Api::namespaced(client.clone(), &self.env.namespace)
    }

    fn tenant_user(&self) -> String {
        format!("system:serviceaccount:{}:{TENANT}", self.env.namespace)
    }

    /// Waits until both Pod policies are enforced: a tenant's gpuvm Pod is refused, and
    /// so is an operator's Pod that leaves out a device of its allocation.
    async fn pod_policies_active(&self) -> anyhow::Result<()> {
        let pod = build_pod(&self.machine_a)?;
        let tenant = self.pods(&self.tenant);
        eventually("the gpuvm Pod policy to be enforced", ACTIVE, || {
            let (tenant, pod) = (tenant.clone(), pod.clone());
            async move { Ok(probe(&tenant, &pod).await?.map(|_| ())) }
        })
        .await?;
        let mut partial = pod.clone();
        set_devices(&mut partial, L40S_GPU);
        let operator = self.pods(&self.operator);
        eventually("the allocation policy to be enforced", ACTIVE, || {
            let (operator, partial) = (operator.clone(), partial.clone());
            async move { Ok(probe(&operator, &partial).await?.map(|_| ())) }
        })
        .await
    }
}

/// A machine of the test's namespace (created, so it has a uid) with an allocation
/// record for its node giving it the L40S and its audio function; its status is set in
/// memory as the operator mirrors it.
async fn placed(env: &TestEnv, name: &str, node: &str) -> anyhow::Result<GpuMachine> {
    let mut machine = env
        .apply(&env.machine(name, "l40s", 1))
        .await
        .with_context(|| format!("creating machine {name}"))?;
    let owner = MachineRef {
        namespace: env.namespace.clone(),
        name: name.to_owned(),
        uid: machine.uid().context("a created machine has a uid")?,
    };
    let mut spec = GpuAllocationSpec::default();
    let gpus = spec
        .claim(
            &owner,
            &[AllocatedGpu {
                pci_address: L40S_GPU.to_owned(),
                model: "l40s".to_owned(),
                iommu_group: Some(12),
                numa_node: Some(0),
                companions: vec![L40S_AUDIO.to_owned()],
            }],
        )
        .map_err(|clash| anyhow::anyhow!("{clash}"))?;
    let records: Api<GpuAllocation> = Api::all(env.client.clone());
    records
        .create(&PostParams::default(), &GpuAllocation::new(node, spec))
        .await
        .with_context(|| format!("creating GpuAllocation {node}"))?;
    machine.status = Some(GpuMachineStatus {
        node_name: Some(node.to_owned()),
        gpus,
        ..GpuMachineStatus::default()
    });
    Ok(machine)
}

fn rule(resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    }
}

/// A Role in `namespace` with `rules`, bound to ServiceAccount `sa_namespace/sa`.
async fn grant(
    admin: &Client,
    namespace: &str,
    name: &str,
    sa_namespace: &str,
    sa: &str,
    rules: Vec<PolicyRule>,
) -> anyhow::Result<()> {
    let meta = ObjectMeta {
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    };
    Api::<Role>::namespaced(admin.clone(), namespace)
        .create(
            &PostParams::default(),
            &Role {
                metadata: meta.clone(),
                rules: Some(rules),
            },
        )
        .await
        .with_context(|| format!("creating Role {name}"))?;
    Api::<RoleBinding>::namespaced(admin.clone(), namespace)
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: meta,
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".to_owned(),
                    kind: "Role".to_owned(),
                    name: name.to_owned(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".to_owned(),
                    name: sa.to_owned(),
                    namespace: Some(sa_namespace.to_owned()),
                    ..Subject::default()
                }]),
            },
        )
        .await
        .with_context(|| format!("binding Role {name}"))?;
    Ok(())
}

/// A dry-run create: `Ok(Ok(message))` when refused by admission (403 or 422), `Ok(Err)`
/// when admitted, `Err` for anything else.
async fn probe(api: &Api<Pod>, pod: &Pod) -> anyhow::Result<Result<String, String>> {
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    match api.create(&params, pod).await {
        Ok(_) => Ok(Err(format!("Pod {} was admitted", pod.name_any()))),
        Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => Ok(Ok(s.message.clone())),
        Err(e) => Err(e).context("a dry-run Pod create failed unexpectedly"),
    }
}

/// The refusal of a write, or an error when it was accepted.
fn refusal<T>(result: Result<T, kube::Error>, what: &str) -> anyhow::Result<String> {
    match result {
        Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => Ok(s.message.clone()),
        Err(e) => Err(e).with_context(|| format!("{what}: expected a refusal by admission")),
        Ok(_) => bail!("{what} was admitted but must be refused"),
    }
}

/// Asserts a dry-run create of `pod` is refused with a message holding each of `want`.
async fn refused(api: &Api<Pod>, pod: &Pod, want: &[&str], what: &str) -> anyhow::Result<()> {
    let message = match probe(api, pod).await? {
        Ok(message) => message,
        Err(admitted) => bail!("{what}: {admitted}, but must be refused"),
    };
    for part in want {
        ensure!(
            message.contains(part),
            "{what}: the refusal does not say {part:?}: {message}"
        );
    }
    note(&format!("admission: {what}: refused: {message}"));
    Ok(())
}

async fn admitted(api: &Api<Pod>, pod: &Pod, what: &str) -> anyhow::Result<()> {
    if let Ok(message) = probe(api, pod).await? {
        bail!("{what}: refused, but must be admitted: {message}");
    }
    Ok(())
}

fn set_devices(pod: &mut Pod, devices: &str) {
    pod.annotations_mut()
        .insert(keys::ANNOTATION_DEVICES.to_owned(), devices.to_owned());
}

/// A Pod without anything gpuvm about it, `name`, optionally on a node.
fn plain_pod(name: &str, node: Option<&str>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: node.map(str::to_owned),
            containers: vec![Container {
                name: "main".to_owned(),
                image: Some("registry.k8s.io/pause:3.10".to_owned()),
                ..Container::default()
            }],
            automount_service_account_token: Some(false),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// Binds a Pod to a node through pods/binding, as kube-scheduler does (no scheduler
/// runs here).
async fn bind(admin: &Client, namespace: &str, pod: &str, node: &str) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(admin.clone(), namespace);
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": { "name": pod },
        "target": { "apiVersion": "v1", "kind": "Node", "name": node },
    });
    api.create_subresource::<Value, Value>("binding", pod, &PostParams::default(), &binding)
        .await
        .with_context(|| format!("binding Pod {pod} to {node}"))?;
    Ok(())
}

fn annotation_patch(key: &str, value: &str) -> Patch<Value> {
    Patch::Merge(json!({ "metadata": { "annotations": { key: value } } }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_creates_gpuvm_pods_and_only_as_allocated() -> anyhow::Result<()> {
    let Some(setup) = Setup::start("admission-create").await? else {
        return Ok(());
    };
    setup.pod_policies_active().await?;
    let tenant = setup.pods(&setup.tenant);
    let operator = setup.pods(&setup.operator);
    let pod = build_pod(&setup.machine_a)?;
    let tenant_user = setup.tenant_user();
    let only_operator =
        "only the gpuvm operator (system:serviceaccount:gpuvm-system:gpuvm-operator)";

    // Anybody but the operator: refused, whatever the Pod carries.
    refused(
        &tenant,
        &pod,
        &[only_operator, &tenant_user, "create a GpuMachine"],
        "the operator's exact Pod, created by a tenant",
    )
    .await?;
    let mut annotated = plain_pod("hand-written", None);
    set_devices(&mut annotated, L40S_GPU);
    refused(
        &tenant,
        &annotated,
        &[only_operator, &tenant_user],
        "a plain Pod with a devices annotation",
    )
    .await?;
    let mut runtime_class = plain_pod("runtime-class-only", None);
    if let Some(spec) = runtime_class.spec.as_mut() {
        spec.runtime_class_name = Some(keys::RUNTIME_CLASS.to_owned());
    }
    refused(
        &tenant,
        &runtime_class,
        &[only_operator, &tenant_user],
        "runtimeClassName gpuvm without annotations",
    )
    .await?;
    let mut labelled = plain_pod("machine-label", None);
    labelled
        .labels_mut()
        .insert(keys::LABEL_MACHINE.to_owned(), "train-a".to_owned());
    refused(
        &tenant,
        &labelled,
        &[only_operator],
        "a plain Pod posing as a machine's Pod",
    )
    .await?;
    // Cluster-admin is no exception: the operator is the only way to a GPU.
    refused(
        &setup.pods(&setup.env.client),
        &pod,
        &[only_operator, "is not it"],
        "the operator's Pod, created by cluster-admin",
    )
    .await?;
    // The policies leave every other Pod alone.
    admitted(&tenant, &plain_pod("ordinary", None), "an ordinary Pod").await?;

    // The operator's Pod for the allocation: admitted, for real.
    operator
        .create(&PostParams::default(), &pod)
        .await
        .context("the operator's Pod for its allocation must be admitted")?;

    // The operator's Pod with every volume type a GpuMachine may use: admitted; one
    // with a hostPath or a projected service-account token (which the operator never
    // builds): refused.
    let mut with_volumes = setup.machine_a.clone();
    with_volumes.spec.volumes = serde_json::from_value(json!([
        {"name": "models", "persistentVolumeClaim": {"claimName": "llama"}},
        {"name": "token", "secret": {"secretName": "hf"}},
        {"name": "settings", "configMap": {"name": "server"}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "info", "downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}},
        {"name": "both", "projected": {"sources": [{"secret": {"name": "hf"}}, {"configMap": {"name": "server"}}]}},
        {"name": "cache", "ephemeral": {"volumeClaimTemplate": {"spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}},
    ]))?;
    let mut volumes_pod = build_pod(&with_volumes)?;
    volumes_pod.metadata.name = Some("with-volumes".to_owned());
    admitted(
        &operator,
        &volumes_pod,
        "the operator's Pod with a GpuMachine's volumes",
    )
    .await?;
    for (name, volume) in [
        ("host", json!({"hostPath": {"path": "/"}})),
        ("nfs", json!({"nfs": {"server": "10.0.0.1", "path": "/"}})),
        (
            "api",
            json!({"projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}),
        ),
    ] {
        let mut bad = pod.clone();
        bad.metadata.name = Some(format!("volume-{name}"));
        let mut volume = volume;
        volume["name"] = json!(name);
        if let Some(spec) = bad.spec.as_mut() {
            spec.volumes = Some(vec![serde_json::from_value(volume)?]);
        }
        refused(
            &operator,
            &bad,
            &[
                "may only have the volumes a GpuMachine may use",
                &format!("; volume {name} is not one"),
            ],
            &format!("the operator's Pod with volume {name}"),
        )
        .await?;
    }

    // The operator's Pod that does not match the allocation: refused.
    let machine = format!("{}/train-a", setup.env.namespace);
    let mut partial = pod.clone();
    set_devices(&mut partial, L40S_GPU);
    refused(
        &operator,
        &partial,
        &[
            &format!("leaves out {L40S_AUDIO}"),
            &format!("GpuAllocation {}", setup.node_a),
            &machine,
            "whole IOMMU groups",
        ],
        "a Pod leaving out the GPU's audio function",
    )
    .await?;
    let mut extra = pod.clone();
    set_devices(&mut extra, &format!("{L40S_GPU},{L40S_AUDIO},0000:02:00.0"));
    refused(
        &operator,
        &extra,
        &[
            "names 0000:02:00.0 on node",
            "does not give it to",
            &machine,
        ],
        "a Pod naming a device nobody allocated",
    )
    .await?;
    // Machine A's Pod pinned to node B, where the same addresses belong to machine B.
    let mut elsewhere = setup.machine_a.clone();
    if let Some(status) = elsewhere.status.as_mut() {
        status.node_name = Some(setup.node_b.clone());
    }
    refused(
        &operator,
        &build_pod(&elsewhere)?,
        &[
            &format!("names {L40S_GPU}, {L40S_AUDIO} on node {}", setup.node_b),
            &format!("GpuAllocation {} does not give them", setup.node_b),
        ],
        "a Pod on a node where its devices belong to another machine",
    )
    .await?;
    // Machine B's devices on node A: its uid owns nothing there.
    let mut other_owner = pod.clone();
    other_owner.metadata.owner_references = build_pod(&setup.machine_b)?.metadata.owner_references;
    other_owner.metadata.name = Some("other-owner".to_owned());
    other_owner
        .labels_mut()
        .insert(keys::LABEL_MACHINE.to_owned(), "train-b".to_owned());
    refused(
        &operator,
        &other_owner,
        &[
            "does not give them to",
            &format!("{}/train-b", setup.env.namespace),
        ],
        "a Pod owned by another machine",
    )
    .await?;
    let mut orphan = pod.clone();
    orphan.metadata.owner_references = None;
    refused(
        &operator,
        &orphan,
        &["must have its GpuMachine as its controller"],
        "a Pod without its machine as controller",
    )
    .await?;
    let mut unlabelled = pod.clone();
    unlabelled.labels_mut().remove(keys::LABEL_MACHINE);
    refused(
        &operator,
        &unlabelled,
        &["must carry the label gpuvm.dev/machine"],
        "a Pod without its machine label",
    )
    .await?;
    let mut mislabelled = pod.clone();
    mislabelled
        .labels_mut()
        .insert(keys::LABEL_MACHINE.to_owned(), "train-b".to_owned());
    refused(
        &operator,
        &mislabelled,
        &["named by its gpuvm.dev/machine label"],
        "a Pod labelled with another machine",
    )
    .await?;
    let mut unpinned = pod.clone();
    if let Some(spec) = unpinned.spec.as_mut() {
        spec.affinity = None;
    }
    refused(
        &operator,
        &unpinned,
        &["must be pinned to exactly one node"],
        "a Pod not pinned to a node",
    )
    .await?;
    let mut twice = pod.clone();
    set_devices(&mut twice, &format!("{L40S_GPU},{L40S_AUDIO},{L40S_GPU}"));
    refused(
        &operator,
        &twice,
        &["names a device more than once"],
        "a Pod naming a device twice",
    )
    .await?;
    setup.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_allocation_only_machine_pods_are_refused() -> anyhow::Result<()> {
    let Some(setup) = Setup::start("admission-no-params").await? else {
        return Ok(());
    };
    setup.pod_policies_active().await?;
    // No GpuAllocation at all, as right after the chart is installed.
    let records: Api<GpuAllocation> = Api::all(setup.env.client.clone());
    for node in [&setup.node_a, &setup.node_b] {
        records
            .delete(node, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting GpuAllocation {node}"))?;
    }
    let operator = setup.pods(&setup.operator);
    let pod = build_pod(&setup.machine_a)?;
    let message = eventually("the allocation policy to see no records", ACTIVE, || {
        let (operator, pod) = (operator.clone(), pod.clone());
        async move {
            Ok(match probe(&operator, &pod).await? {
                Ok(message) if message.contains("no params found") => Ok(message),
                other => Err(format!("{other:?}")),
            })
        }
    })
    .await?;
    note(&format!(
        "admission: a machine's Pod without any GpuAllocation: {message}"
    ));
    // parameterNotFoundAction: Deny reaches only Pods labelled with a machine: every
    // other Pod of the cluster is still admitted, whoever creates it.
    admitted(
        &setup.pods(&setup.tenant),
        &plain_pod("ordinary", None),
        "a tenant's ordinary Pod",
    )
    .await?;
    admitted(
        &setup.pods(&setup.env.client),
        &plain_pod("admins", Some(&setup.node_a)),
        "cluster-admin's ordinary Pod",
    )
    .await?;
    setup.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpuvm_annotations_are_fixed_once_the_operator_created_the_pod() -> anyhow::Result<()> {
    let Some(setup) = Setup::start("admission-update").await? else {
        return Ok(());
    };
    setup.pod_policies_active().await?;
    let pod = build_pod(&setup.machine_a)?;
    let name = pod.name_any();
    setup
        .pods(&setup.operator)
        .create(&PostParams::default(), &pod)
        .await
        .context("creating the machine's Pod as the operator")?;
    let admin = setup.pods(&setup.env.client);
    let tenant = setup.pods(&setup.tenant);
    let fixed = "cannot change afterwards";

    let message = refusal(
        admin
            .patch(
                &name,
                &PatchParams::default(),
                &annotation_patch(keys::ANNOTATION_DEVICES, "0000:9d:00.0"),
            )
            .await,
        "cluster-admin changing gpuvm.dev/devices",
    )?;
    ensure!(
        message.contains(fixed) && message.contains("changes gpuvm.dev/devices"),
        "{message}"
    );
    let message = refusal(
        tenant
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"annotations": {keys::ANNOTATION_MEMORY: null}}}),
                ),
            )
            .await,
        "a tenant removing gpuvm.dev/memory",
    )?;
    ensure!(message.contains("changes gpuvm.dev/memory"), "{message}");
    let message = refusal(
        tenant
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {keys::LABEL_MACHINE: "train-b"}}})),
            )
            .await,
        "a tenant relabelling the Pod to another machine",
    )?;
    ensure!(message.contains("label gpuvm.dev/machine"), "{message}");
    // Through the status subresource, which may also change metadata.
    let message = refusal(
        tenant
            .patch_status(
                &name,
                &PatchParams::default(),
                &annotation_patch(keys::ANNOTATION_CPUS, "64"),
            )
            .await,
        "a tenant changing gpuvm.dev/cpus through pods/status",
    )?;
    ensure!(message.contains("changes gpuvm.dev/cpus"), "{message}");
    let message = refusal(
        tenant
            .patch(
                &name,
                &PatchParams::default(),
                &annotation_patch(keys::ANNOTATION_GPU_CHECK, "ok: 1 x l40s"),
            )
            .await,
        "a tenant faking the in-guest GPU check",
    )?;
    ensure!(
        message.contains("gpuvm.dev/gpu-check is written only by the gpuvm node agent"),
        "{message}"
    );
    let message = refusal(
        tenant
            .patch_subresource(
                "resize",
                &name,
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"containers": [{
                    "name": "machine",
                    "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}},
                }]}})),
            )
            .await,
        "a tenant resizing the VM's Pod in place",
    )?;
    ensure!(message.contains("cannot be resized in place"), "{message}");
    // A plain Pod of the tenant cannot become a gpuvm Pod either.
    tenant
        .create(&PostParams::default(), &plain_pod("plain", None))
        .await
        .context("creating a plain Pod as the tenant")?;
    let message = refusal(
        tenant
            .patch(
                "plain",
                &PatchParams::default(),
                &annotation_patch(keys::ANNOTATION_DEVICES, L40S_GPU),
            )
            .await,
        "a tenant adding gpuvm.dev/devices to a plain Pod",
    )?;
    ensure!(message.contains("changes gpuvm.dev/devices"), "{message}");
    // What is not gpuvm's stays editable.
    tenant
        .patch(
            &name,
            &PatchParams::default(),
            &annotation_patch("team.example/owner", "ml"),
        )
        .await
        .context("a tenant's own annotation on a gpuvm Pod must be admitted")?;
    let stored = admin.get(&name).await?;
    ensure!(
        stored.annotations().get(keys::ANNOTATION_DEVICES)
            == Some(&format!("{L40S_GPU},{L40S_AUDIO}")),
        "the devices annotation changed: {:?}",
        stored.annotations()
    );
    setup.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_operator_passes_its_own_admission() -> anyhow::Result<()> {
    let Some(mut setup) = Setup::start("admission-operator").await? else {
        return Ok(());
    };
    setup.pod_policies_active().await?;
    let admin = setup.env.client.clone();
    // The policies are under test here, not RBAC: the operator's ServiceAccount may do
    // anything RBAC allows (the chart's ClusterRole is tested in charts/tests).
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(
            &PostParams::default(),
            &ClusterRoleBinding {
                metadata: ObjectMeta {
                    name: Some(format!("{}-operator-admin", setup.env.run)),
                    ..ObjectMeta::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".to_owned(),
                    kind: "ClusterRole".to_owned(),
                    name: "cluster-admin".to_owned(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".to_owned(),
                    name: OPERATOR_SERVICE_ACCOUNT.to_owned(),
                    namespace: Some(RELEASE_NAMESPACE.to_owned()),
                    ..Subject::default()
                }]),
            },
        )
        .await
        .context("binding the operator's ServiceAccount")?;
    let token =
        service_account_token(&admin, RELEASE_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, None).await?;
    let work = tempfile::tempdir()?;
    let kubeconfig = work.path().join("operator-kubeconfig");
    write_token_kubeconfig(setup.env.cp.kubeconfig_path(), &token, &kubeconfig)?;
    // A third node, free, for a machine the operator places itself.
    setup.env.add_hosts(HostKind::L40sWorkstation, 1).await?;
    let fresh = setup.env.machine("fresh", "l40s", 1);
    setup.env.apply(&fresh).await?;

    // The real operator, as its ServiceAccount: it mirrors train-a and train-b from their
    // records and creates their Pods, and places "fresh" (record first, then the Pod).
    let _operator = Operator::start(
        &kubeconfig,
        OperatorOptions::single(&setup.env.namespace),
        setup.env.cp.work_dir(),
    )
    .await?;
    for (pod, node) in [
        ("train-a-vm", Some(setup.node_a.as_str())),
        ("train-b-vm", Some(setup.node_b.as_str())),
        ("fresh-vm", None),
    ] {
        let pod = setup
            .env
            .wait_pod(pod, Duration::from_secs(90))
            .await
            .with_context(|| format!("the operator's Pod {pod} (refused by admission?)"))?;
        let pinned = gpuvm_e2e::invariants::pinned_node(&pod);
        if let Some(node) = node {
            ensure!(
                pinned.as_deref() == Some(node),
                "{} on {pinned:?}",
                pod.name_any()
            );
        }
        ensure!(
            pod.annotations().get(keys::ANNOTATION_DEVICES)
                == Some(&format!("{L40S_GPU},{L40S_AUDIO}")),
            "{}: {:?}",
            pod.name_any(),
            pod.annotations()
        );
    }
    setup.env.cleanup().await;
    Ok(())
}

/// events.k8s.io/v1 Events.
fn events_api(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("events.k8s.io", "v1", "Event"));
    Api::namespaced_with(client.clone(), namespace, &resource)
}

fn event(name: &str, pod: &Pod, instance: &str) -> anyhow::Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": { "name": name },
        "eventTime": "2026-12-01T00:00:00.000000Z",
        "reportingController": "gpuvm-node",
        "reportingInstance": instance,
        "action": "GuestGpuCheck",
        "reason": "GuestGpuCheckFailed",
        "note": "no NVIDIA driver in the guest",
        "type": "Warning",
        "regarding": {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": pod.namespace(),
            "name": pod.name_any(),
            "uid": pod.uid(),
        },
    }))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_agent_writes_only_what_belongs_to_its_node() -> anyhow::Result<()> {
    let Some(setup) = Setup::start("admission-node-agent").await? else {
        return Ok(());
    };
    let admin = setup.env.client.clone();
    let (node_a, node_b) = (setup.node_a.as_str(), setup.node_b.as_str());
    let namespace = setup.env.namespace.clone();
    setup.pod_policies_active().await?;

    // A gpuvm Pod on each node, made by the operator and bound as the scheduler would.
    let operator = setup.pods(&setup.operator);
    let mut pods = BTreeMap::new();
    for (machine, node) in [(&setup.machine_a, node_a), (&setup.machine_b, node_b)] {
        let pod = operator
            .create(&PostParams::default(), &build_pod(machine)?)
            .await
            .context("creating a machine's Pod as the operator")?;
        bind(&admin, &namespace, &pod.name_any(), node).await?;
        let pod = setup.pods(&admin).get(&pod.name_any()).await?;
        pods.insert(node.to_owned(), pod);
    }

    // The agent's own Pod on node A and a token bound to it, as the DaemonSet mounts it.
    let agent_pod = Api::<Pod>::namespaced(admin.clone(), RELEASE_NAMESPACE)
        .create(&PostParams::default(), &{
            let mut p = plain_pod(&format!("gpuvm-node-{node_a}"), Some(node_a));
            if let Some(spec) = p.spec.as_mut() {
                spec.service_account_name = Some(NODE_SERVICE_ACCOUNT.to_owned());
            }
            p
        })
        .await
        .context("creating the node agent's Pod on node A")?;
    let kubeconfig = setup.env.cp.kubeconfig_path().to_owned();
    let token = service_account_token(
        &admin,
        RELEASE_NAMESPACE,
        NODE_SERVICE_ACCOUNT,
        Some(&agent_pod),
    )
    .await?;
    let agent = token_client(&kubeconfig, &token).await?;
    let unbound =
        service_account_token(&admin, RELEASE_NAMESPACE, NODE_SERVICE_ACCOUNT, None).await?;
    let unbound = token_client(&kubeconfig, &unbound).await?;

    let nodes: Api<Node> = Api::all(agent.clone());
    let label =
        |key: &str, value: &str| Patch::Merge(json!({ "metadata": { "labels": { key: value } } }));
    let params = PatchParams::default();
    // Wait for the node-agent policy: node B's labels are refused to agent A.
    eventually("the node-agent policy to be enforced", ACTIVE, || {
        let nodes = nodes.clone();
        let (params, patch) = (params.clone(), label(keys::LABEL_GPU_COUNT, "0"));
        async move {
            Ok(match nodes.patch(node_b, &params, &patch).await {
                Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => Ok(()),
                other => Err(format!("{:?}", other.map(|n| n.name_any()))),
            })
        }
    })
    .await?;

    // Node: its own gpuvm labels, nothing else, nothing of B.
    nodes
        .patch(node_a, &params, &label(keys::LABEL_GPU_COUNT, "0"))
        .await
        .context("agent A labelling its own Node")?;
    let message = refusal(
        nodes
            .patch(node_b, &params, &label(keys::LABEL_GPU_COUNT, "0"))
            .await,
        "agent A labelling Node B",
    )?;
    ensure!(
        message.contains(&format!(
            "node agent of node {node_a} may only update its own Node"
        )),
        "{message}"
    );
    let message = refusal(
        nodes
            .patch(
                node_a,
                &params,
                &label("node-role.kubernetes.io/control-plane", ""),
            )
            .await,
        "agent A setting a label it does not own",
    )?;
    ensure!(message.contains("may change only the labels"), "{message}");
    let message = refusal(
        nodes
            .patch(
                node_a,
                &params,
                &Patch::Merge(json!({"spec": {"taints": null}})),
            )
            .await,
        "agent A removing its Node's taints",
    )?;
    ensure!(message.contains("may change only the labels"), "{message}");

    // GpuNode: its own, created and published; not B's, not a new one for another node.
    let gpu_nodes: Api<GpuNode> = Api::all(agent.clone());
    let heartbeat = Patch::Merge(json!({"status": {"message": "published by agent A"}}));
    gpu_nodes
        .patch_status(node_a, &params, &heartbeat)
        .await
        .context("agent A publishing its GpuNode")?;
    let message = refusal(
        gpu_nodes.patch_status(node_b, &params, &heartbeat).await,
        "agent A publishing GpuNode B",
    )?;
    ensure!(
        message.contains(&format!("may only create and publish GpuNode {node_a}")),
        "{message}"
    );
    let message = refusal(
        gpu_nodes
            .create(&PostParams::default(), &gpu_node("someone-else"))
            .await,
        "agent A creating another node's GpuNode",
    )?;
    ensure!(message.contains("may only create and publish"), "{message}");
    Api::<GpuNode>::all(admin.clone())
        .delete(node_a, &DeleteParams::default())
        .await
        .context("deleting GpuNode A")?;
    gpu_nodes
        .create(&PostParams::default(), &gpu_node(node_a))
        .await
        .context("agent A creating its own GpuNode")?;

    // Pods: the gpu-check annotation of Pods on node A only.
    let agent_pods: Api<Pod> = Api::namespaced(agent.clone(), &namespace);
    let pod_a = pods[node_a].name_any();
    let pod_b = pods[node_b].name_any();
    agent_pods
        .patch(
            &pod_a,
            &params,
            &annotation_patch(keys::ANNOTATION_GPU_CHECK, "ok: 1 x l40s"),
        )
        .await
        .context("agent A reporting the GPU check of a Pod on node A")?;
    let message = refusal(
        agent_pods
            .patch(
                &pod_b,
                &params,
                &annotation_patch(keys::ANNOTATION_GPU_CHECK, "failed: forged"),
            )
            .await,
        "agent A reporting the GPU check of a Pod on node B",
    )?;
    // Both policies refuse this one; either message names the node.
    ensure!(
        message.contains("may only annotate Pods on that node")
            || message.contains(&format!("of node {node_a} may not change it")),
        "{message}"
    );
    // Any Pod on node B, gpuvm or not, is out of its reach.
    let mut plain_b = plain_pod("plain-on-b", Some(node_b));
    plain_b.metadata.namespace = Some(namespace.clone());
    setup
        .pods(&admin)
        .create(&PostParams::default(), &plain_b)
        .await
        .context("creating a plain Pod on node B")?;
    let message = refusal(
        agent_pods
            .patch(
                "plain-on-b",
                &params,
                &annotation_patch("team.example/owner", "x"),
            )
            .await,
        "agent A annotating a plain Pod on node B",
    )?;
    ensure!(
        message.contains(&format!(
            "node agent of node {node_a} may only annotate Pods on that node"
        )),
        "{message}"
    );
    let message = refusal(
        agent_pods
            .patch(
                &pod_a,
                &params,
                &annotation_patch("team.example/owner", "x"),
            )
            .await,
        "agent A changing another annotation of a Pod on node A",
    )?;
    ensure!(
        message.contains("may change only the gpuvm.dev/gpu-check annotation"),
        "{message}"
    );

    // Events: reported as node A's instance only.
    let events = events_api(&agent, &namespace);
    events
        .create(
            &PostParams::default(),
            &event("check-a", &pods[node_a], node_a)?,
        )
        .await
        .context("agent A reporting an Event as node A")?;
    let message = refusal(
        events
            .create(
                &PostParams::default(),
                &event("check-b", &pods[node_b], node_b)?,
            )
            .await,
        "agent A reporting an Event as node B",
    )?;
    ensure!(
        message.contains(&format!("reportingInstance is {node_a}")),
        "{message}"
    );

    // A node agent token not bound to a Pod carries no node: refused outright.
    let message = refusal(
        Api::<Node>::all(unbound)
            .patch(node_a, &params, &label(keys::LABEL_GPU_COUNT, "1"))
            .await,
        "the node agent's unbound token",
    )?;
    ensure!(message.contains("credentials name no node"), "{message}");
    setup.env.cleanup().await;
    Ok(())
}
