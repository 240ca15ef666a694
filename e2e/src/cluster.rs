//! One test's world on the API server: the CRDs, a namespace, fake GPU nodes kept Ready,
//! operators, and polling helpers.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use gpuvm_api::{GpuMachine, GpuNode, keys};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::control_plane::ControlPlane;
use crate::fixtures::{self, HostKind, LABEL_RUN};
use crate::invariants;
use crate::note;
use crate::operator::{Operator, OperatorOptions};

/// The committed CRDs, as deployed.
pub const CRDS: [&str; 3] = [
    include_str!("../../crds/gpuallocations.gpuvm.dev.yaml"),
    include_str!("../../crds/gpumachines.gpuvm.dev.yaml"),
    include_str!("../../crds/gpunodes.gpuvm.dev.yaml"),
];

/// Field manager of the test's own writes.
pub const FIELD_MANAGER: &str = "gpuvm-e2e";

/// How often the fake nodes' heartbeats are refreshed.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// One of the two beats the keeper sends for each node (see [`TestEnv::stop_beat`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Beat {
    /// The Node's Ready condition, as kubelet would refresh it.
    NodeReady,
    /// The GpuNode's heartbeat, as the node agent would refresh it.
    GpuNodeHeartbeat,
}

type Silenced = Arc<Mutex<BTreeSet<(String, Beat)>>>;

/// What a poll found: done with a value, or not yet, with what was seen.
pub type Check<T> = Result<T, String>;

/// Whether the operator has caught up with a machine's spec: its status's
/// `observedGeneration` is the machine's `metadata.generation`. A check for
/// [`TestEnv::wait_machine`], alone or with others.
pub fn generation_observed(machine: &GpuMachine) -> Check<()> {
    let status = machine.status.as_ref().ok_or("no status")?;
    if status.observed_generation == machine.metadata.generation {
        Ok(())
    } else {
        Err(format!(
            "observedGeneration {:?} of generation {:?}",
            status.observed_generation, machine.metadata.generation
        ))
    }
}

/// Polls `probe` every 250 ms until it returns `Ok(Ok(value))` or `timeout` passes.
/// An `Err` from the probe (an API error) counts as "not yet". The error on timeout
/// says what was waited for and what the last poll saw.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Check<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(seen)) => seen,
            Err(e) => format!("error: {e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "timed out after {} s waiting for {what}; last seen: {last}",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A test's environment: the control plane, the CRDs, a fresh namespace (with its
/// `default` ServiceAccount), the `gpuvm` RuntimeClass, and the nodes it adds.
pub struct TestEnv {
    /// The API server (dropped last: it kills the processes).
    pub cp: ControlPlane,
    /// Admin client.
    pub client: Client,
    /// The test's namespace; machines and the leader Lease live here.
    pub namespace: String,
    /// The run id, the value of `gpuvm.dev/e2e-run` on this test's Nodes.
    pub run: String,
    nodes: BTreeMap<String, HostKind>,
    keeper: Option<JoinHandle<()>>,
    silenced: Silenced,
}

impl std::fmt::Debug for TestEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestEnv")
            .field("namespace", &self.namespace)
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
    }
}

impl TestEnv {
    /// Brings up (or connects to) the API server and prepares a namespace for `test`;
    /// `None` after printing `SKIPPED: <reason>` when there is no server.
    pub async fn start(test: &str) -> anyhow::Result<Option<TestEnv>> {
        let Some(cp) = ControlPlane::try_start_for(Some(test)).await? else {
            return Ok(None);
        };
        let client = cp.client();
        let run = run_id(test);
        let namespace = format!("gpuvm-e2e-{run}");
        apply_crds(&client).await?;
        ensure_runtime_class(&client).await?;
        create_namespace(&client, &namespace).await?;
        note(&format!("e2e: {test}: namespace {namespace}"));
        Ok(Some(TestEnv {
            cp,
            client,
            namespace,
            run,
            nodes: BTreeMap::new(),
            keeper: None,
            silenced: Silenced::default(),
        }))
    }

    /// The machines of the test's namespace.
    pub fn machines(&self) -> Api<GpuMachine> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The Pods of the test's namespace.
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// All GpuNodes.
    pub fn gpu_nodes(&self) -> Api<GpuNode> {
        Api::all(self.client.clone())
    }

    /// A machine of this test (namespace, node selector for this run's nodes).
    pub fn machine(&self, name: &str, model: &str, count: i32) -> GpuMachine {
        fixtures::machine(&self.namespace, name, model, count, &self.run)
    }

    /// The name of the `i`-th node of a kind.
    pub fn node_name(&self, kind: HostKind, i: usize) -> String {
        format!("{}-{}-{i}", self.run, kind.tag())
    }

    /// Adds `count` hosts of `kind`: a Ready, tainted Node and its GpuNode with the
    /// inventory and a fresh heartbeat, both through their status subresources. Starts
    /// the heartbeat keeper on first use.
    pub async fn add_hosts(&mut self, kind: HostKind, count: usize) -> anyhow::Result<Vec<String>> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let gpu_nodes = self.gpu_nodes();
        let first = self.nodes.values().filter(|k| **k == kind).count();
        let mut names = Vec::new();
        for i in first..first + count {
            let name = self.node_name(kind, i);
            nodes
                .create(
                    &PostParams::default(),
                    &fixtures::node(&name, kind, &self.run),
                )
                .await
                .with_context(|| format!("creating Node {name}"))?;
            nodes
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(fixtures::node_ready_patch()),
                )
                .await
                .with_context(|| format!("marking Node {name} Ready"))?;
            gpu_nodes
                .create(&PostParams::default(), &fixtures::gpu_node(&name))
                .await
                .with_context(|| format!("creating GpuNode {name}"))?;
            gpu_nodes
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(fixtures::gpu_node_status_patch(kind)),
                )
                .await
                .with_context(|| format!("publishing GpuNode {name}'s inventory"))?;
            self.nodes.insert(name.clone(), kind);
            names.push(name);
        }
        self.start_keeper();
        Ok(names)
    }

    /// Refreshes every node's Ready heartbeat and GpuNode heartbeat periodically, as
    /// kubelet and the node agent would (a node-lifecycle controller on a real cluster
    /// would otherwise mark the fake Nodes NotReady).
    fn start_keeper(&mut self) {
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
        let client = self.client.clone();
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        let silenced = self.silenced.clone();
        self.keeper = Some(tokio::spawn(async move {
            let nodes: Api<Node> = Api::all(client.clone());
            let gpu_nodes: Api<GpuNode> = Api::all(client);
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                for name in &names {
                    let silent = |beat| {
                        silenced
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .contains(&(name.clone(), beat))
                    };
                    if silent(Beat::NodeReady) && silent(Beat::GpuNodeHeartbeat) {
                        continue;
                    }
                    if silent(Beat::GpuNodeHeartbeat) {
                        let _ = nodes
                            .patch_status(
                                name,
                                &PatchParams::default(),
                                &Patch::Merge(fixtures::node_ready_patch()),
                            )
                            .await;
                        continue;
                    }
                    if silent(Beat::NodeReady) {
                        let _ = gpu_nodes
                            .patch_status(
                                name,
                                &PatchParams::default(),
                                &Patch::Merge(json!({"status": {"heartbeat": fixtures::now()}})),
                            )
                            .await;
                        continue;
                    }
                    // Best effort: a missed beat is harmless, the next one follows.
                    let _ = nodes
                        .patch_status(
                            name,
                            &PatchParams::default(),
                            &Patch::Merge(fixtures::node_ready_patch()),
                        )
                        .await;
                    let _ = gpu_nodes
                        .patch_status(
                            name,
                            &PatchParams::default(),
                            &Patch::Merge(json!({"status": {"heartbeat": fixtures::now()}})),
                        )
                        .await;
                }
            }
        }));
    }

    /// Stops the keeper refreshing one beat of node `name` (a dead kubelet, a dead node
    /// agent), so a test can make a node go stale.
    pub fn stop_beat(&self, name: &str, beat: Beat) {
        self.silenced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((name.to_owned(), beat));
    }

    /// Stops the heartbeat keeper for good. On this harness's control plane no node
    /// lifecycle controller runs, so Nodes stay Ready without it; a test with many nodes
    /// (and a long operator heartbeat timeout) can spare the API server the keeper's
    /// writes.
    pub fn stop_keeper(&mut self) {
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
    }

    /// Lets the keeper refresh a beat that [`TestEnv::stop_beat`] stopped.
    pub fn resume_beat(&self, name: &str, beat: Beat) {
        self.silenced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(name.to_owned(), beat));
    }

    /// The frame most operator tests share: the environment, `count` hosts of `kind`
    /// (their names come back) and one operator replica without leader election. `None`
    /// (after `SKIPPED: <reason>`) when there is no API server.
    pub async fn with_operator(
        test: &str,
        kind: HostKind,
        count: usize,
    ) -> anyhow::Result<Option<(TestEnv, Vec<String>, Operator)>> {
        let Some(mut env) = TestEnv::start(test).await? else {
            return Ok(None);
        };
        let hosts = env.add_hosts(kind, count).await?;
        let op = env
            .start_operator(OperatorOptions::single(&env.namespace))
            .await?;
        Ok(Some((env, hosts, op)))
    }

    /// Ends a test: a failed `result` comes back with each operator's state and the
    /// tail of its log; a passed one tidies up ([`TestEnv::cleanup`]).
    pub async fn finish(
        self,
        result: anyhow::Result<()>,
        operators: &mut [&mut Operator],
    ) -> anyhow::Result<()> {
        if let Err(e) = result {
            let logs: Vec<String> = operators
                .iter_mut()
                .map(|op| {
                    let identity = op.identity().to_owned();
                    format!("--- operator {identity} ---\n{}", op.describe())
                })
                .collect();
            bail!("{e:#}\n{}", logs.join("\n"));
        }
        self.cleanup().await;
        Ok(())
    }

    /// Starts an operator replica against this control plane.
    pub async fn start_operator(&self, options: OperatorOptions) -> anyhow::Result<Operator> {
        Operator::start(self.cp.kubeconfig_path(), options, self.cp.work_dir()).await
    }

    /// Creates or updates a machine by server-side apply, as `kubectl apply
    /// --server-side` would.
    pub async fn apply(&self, machine: &GpuMachine) -> Result<GpuMachine, kube::Error> {
        self.machines()
            .patch(
                &machine.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(machine),
            )
            .await
    }

    /// Applies a raw manifest (for specs the Rust types cannot express).
    pub async fn apply_json(
        &self,
        name: &str,
        manifest: &serde_json::Value,
    ) -> Result<GpuMachine, kube::Error> {
        self.machines()
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(manifest),
            )
            .await
    }

    /// The API server's refusal of applying `manifest` as `name`; an error when it
    /// was accepted or failed otherwise.
    pub async fn apply_rejected(
        &self,
        name: &str,
        manifest: &serde_json::Value,
    ) -> anyhow::Result<Box<kube::core::Status>> {
        match self.apply_json(name, manifest).await {
            Err(kube::Error::Api(status)) => Ok(status),
            Err(e) => Err(e).context("expected a validation error from the API server"),
            Ok(m) => bail!("{} was accepted but must be rejected", m.name_any()),
        }
    }

    /// Applies `manifest` as `name` expecting a 422 whose message contains `want`
    /// (noted); otherwise a sentence saying what came instead.
    pub async fn expect_invalid(
        &self,
        name: &str,
        manifest: &serde_json::Value,
        want: &str,
    ) -> Result<(), String> {
        match self.apply_rejected(name, manifest).await {
            Ok(status) if status.code == 422 && status.message.contains(want) => {
                note(&format!("e2e: {name}: rejected: {}", status.message));
                Ok(())
            }
            Ok(status) => Err(format!(
                "{name}: want 422 with {want:?}, got {} {:?}",
                status.code, status.message
            )),
            Err(e) => Err(format!("{name}: {e:#}")),
        }
    }

    /// Applies many machines, 16 requests at a time.
    pub async fn apply_all(&self, machines: &[GpuMachine]) -> anyhow::Result<()> {
        use futures::{StreamExt as _, TryStreamExt as _};
        futures::stream::iter(machines.iter().map(|m| async move {
            self.apply(m)
                .await
                .with_context(|| format!("applying {}", m.name_any()))
        }))
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
        Ok(())
    }

    /// Deletes a machine (its finalizer keeps it until the operator cleans up).
    pub async fn delete_machine(&self, name: &str) -> anyhow::Result<()> {
        match self.machines().delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting {name}")),
        }
    }

    /// The Events of the test's namespace with `reason` about the object named `name`.
    pub async fn events(&self, name: &str, reason: &str) -> anyhow::Result<Vec<Event>> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.namespace);
        Ok(api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
            .collect())
    }

    /// Waits until the operator has observed machine `name`'s current generation
    /// ([`generation_observed`]), returning the machine.
    pub async fn wait_generation_observed(
        &self,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<GpuMachine> {
        self.wait_machine(
            name,
            "its generation observed",
            timeout,
            generation_observed,
        )
        .await
    }

    /// Waits until machine `name` satisfies `check`, returning it.
    pub async fn wait_machine<F>(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: F,
    ) -> anyhow::Result<GpuMachine>
    where
        F: Fn(&GpuMachine) -> Check<()>,
    {
        let api = self.machines();
        eventually(&format!("machine {name}: {what}"), timeout, || {
            let api = api.clone();
            let check = &check;
            async move {
                Ok(match api.get_opt(name).await? {
                    None => Err("the machine does not exist".to_owned()),
                    Some(m) => check(&m).map(|()| m.clone()).map_err(|why| {
                        format!(
                            "{why}; status: {}",
                            serde_json::to_string(&m.status).unwrap_or_default()
                        )
                    }),
                })
            }
        })
        .await
    }

    /// Waits until Pod `name` exists in the namespace, returning it.
    pub async fn wait_pod(&self, name: &str, timeout: Duration) -> anyhow::Result<Pod> {
        let pods = self.pods();
        eventually(&format!("Pod {name} to exist"), timeout, || {
            let pods = pods.clone();
            async move {
                Ok(pods
                    .get_opt(name)
                    .await?
                    .ok_or_else(|| "no such Pod".to_owned()))
            }
        })
        .await
    }

    /// Waits until an object is gone (`get` says 404).
    pub async fn wait_gone<K>(
        &self,
        api: &Api<K>,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<()>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        eventually(&format!("{name} to be deleted"), timeout, || async move {
            Ok(match api.get_opt(name).await? {
                None => Ok(()),
                Some(o) => Err(format!(
                    "still there (deletionTimestamp {:?}, finalizers {:?})",
                    o.meta().deletion_timestamp,
                    o.meta().finalizers
                )),
            })
        })
        .await
    }

    /// Waits until `n` machine Pods exist in the namespace.
    pub async fn wait_pod_count(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<Pod>> {
        let pods = self.pods();
        let lp = ListParams::default().labels(keys::LABEL_MACHINE);
        eventually(&format!("{n} machine Pods"), timeout, || {
            let pods = pods.clone();
            let lp = lp.clone();
            async move {
                let list = pods.list(&lp).await?;
                Ok(if list.items.len() >= n {
                    Ok(list.items)
                } else {
                    Err(format!("{} Pods", list.items.len()))
                })
            }
        })
        .await
    }

    /// Lists the namespace's machines, this run's GpuNodes and the machine Pods, and
    /// checks the allocation invariants ([`invariants`]). Returns how many are placed.
    pub async fn check_invariants(&self) -> anyhow::Result<usize> {
        let machines = self.machines().list(&ListParams::default()).await?.items;
        let gpu_nodes: Vec<GpuNode> = self
            .gpu_nodes()
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|g| self.nodes.contains_key(&g.name_any()))
            .collect();
        let pods = self
            .pods()
            .list(&ListParams::default().labels(keys::LABEL_MACHINE))
            .await?
            .items;
        let mut errors = match invariants::check_allocations(&machines, &gpu_nodes) {
            Ok(_) => Vec::new(),
            Err(e) => e,
        };
        errors.extend(invariants::check_pods(&machines, &pods));
        if !errors.is_empty() {
            bail!("allocation invariants broken:\n  {}", errors.join("\n  "));
        }
        Ok(machines
            .iter()
            .filter(|m| m.status.as_ref().is_some_and(|s| s.is_placed()))
            .count())
    }

    /// Tidies up what the test made on an existing cluster (a loopback control plane is
    /// simply thrown away): machines (finalizers dropped), Pods, nodes, the namespace.
    pub async fn cleanup(mut self) {
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
        if !self.cp.is_external() {
            return;
        }
        let machines = self.machines();
        if let Ok(list) = machines.list(&ListParams::default()).await {
            for m in list.items {
                let _ = machines
                    .patch(
                        &m.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
                let _ = machines
                    .delete(&m.name_any(), &DeleteParams::default())
                    .await;
            }
        }
        let _ = self
            .pods()
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await;
        let nodes: Api<Node> = Api::all(self.client.clone());
        let gpu_nodes = self.gpu_nodes();
        for name in self.nodes.keys() {
            let _ = nodes.delete(name, &DeleteParams::default()).await;
            let _ = gpu_nodes.delete(name, &DeleteParams::default()).await;
        }
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces
            .delete(&self.namespace, &DeleteParams::default())
            .await;
    }
}

/// A short, unique, DNS-safe id for one test run.
pub fn run_id(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let salt = (nanos ^ u128::from(std::process::id()).rotate_left(40)) % 36u128.pow(5);
    let mut suffix = String::new();
    let mut n = salt;
    for _ in 0..5 {
        let digit = u32::try_from(n % 36).unwrap_or(0);
        suffix.push(char::from_digit(digit, 36).unwrap_or('0'));
        n /= 36;
    }
    let stem: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(20)
        .collect();
    format!("{}-{suffix}", stem.trim_matches('-'))
}

/// Applies the committed CRDs by server-side apply and waits until both are Established.
pub async fn apply_crds(client: &Client) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for text in CRDS {
        let crd: CustomResourceDefinition =
            serde_saphyr::from_str(text).context("parsing a committed CRD")?;
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("applying CRD {name}"))?;
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .with_context(|| format!("CRD {name} not Established within 30 s"))?
        .with_context(|| format!("watching CRD {name}"))?;
    }
    // Established can precede the new REST endpoints by a moment: wait for a list.
    let machines: Api<GpuMachine> = Api::all(client.clone());
    let gpu_nodes: Api<GpuNode> = Api::all(client.clone());
    eventually(
        "the gpuvm.dev API to be served",
        Duration::from_secs(30),
        || {
            let machines = machines.clone();
            let gpu_nodes = gpu_nodes.clone();
            async move {
                machines.list(&ListParams::default().limit(1)).await?;
                gpu_nodes.list(&ListParams::default().limit(1)).await?;
                Ok(Ok(()))
            }
        },
    )
    .await
}

/// The RuntimeClass the operator's Pods name; Pod admission rejects a Pod whose
/// RuntimeClass does not exist.
pub async fn ensure_runtime_class(client: &Client) -> anyhow::Result<()> {
    let api: Api<RuntimeClass> = Api::all(client.clone());
    let rc = RuntimeClass {
        metadata: ObjectMeta {
            name: Some(keys::RUNTIME_CLASS.to_owned()),
            ..ObjectMeta::default()
        },
        handler: keys::RUNTIME_CLASS.to_owned(),
        overhead: None,
        scheduling: None,
    };
    match api.create(&PostParams::default(), &rc).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(e) => Err(e).context("creating RuntimeClass gpuvm"),
    }
}

/// Creates a namespace and its `default` ServiceAccount (Pod admission needs it, and
/// without kube-controller-manager nobody else makes it).
pub async fn create_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(LABEL_RUN.to_owned(), name.to_owned())])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match namespaces.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_already_exists() => {}
        Err(e) => return Err(e).with_context(|| format!("creating namespace {name}")),
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("default".to_owned()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    match accounts.create(&PostParams::default(), &sa).await {
        Ok(_) => Ok(()),
        // kube-controller-manager's serviceaccount controller may have been quicker.
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating ServiceAccount {name}/default")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_dns_labels() {
        let id = run_id("Two_Operators at once!");
        assert!(id.len() <= 26, "{id}");
        assert!(
            id.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{id}"
        );
        assert!(!id.starts_with('-') && !id.ends_with('-'), "{id}");
        // Node names built from it stay valid too.
        assert!(format!("gpuvm-e2e-{id}").len() <= 63);
    }

    #[test]
    fn committed_crds_parse() {
        for text in CRDS {
            let crd: CustomResourceDefinition = serde_saphyr::from_str(text).unwrap();
            assert_eq!(crd.spec.group, "gpuvm.dev");
            // GpuAllocation is all spec (the record itself, written with update +
            // resourceVersion); the others carry a status subresource.
            let has_status = crd.spec.versions[0]
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some());
            assert_eq!(
                has_status,
                crd.spec.names.kind != "GpuAllocation",
                "{}",
                crd.spec.names.kind
            );
        }
    }

    #[tokio::test]
    async fn eventually_polls_until_done_or_times_out() {
        let mut n = 0;
        let got = eventually("three polls", Duration::from_secs(5), || {
            n += 1;
            let now = n;
            async move {
                Ok(if now >= 3 {
                    Ok(now)
                } else {
                    Err(format!("poll {now}"))
                })
            }
        })
        .await
        .unwrap();
        assert_eq!(got, 3);
        let err = eventually::<(), _, _>("never", Duration::from_millis(300), || async {
            Ok(Err("still no".to_owned()))
        })
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("waiting for never") && msg.contains("still no"),
            "{msg}"
        );
    }
}
