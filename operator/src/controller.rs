//! The reconciler: the thin I/O layer around the pure decisions in [`crate::scheduler`],
//! [`crate::pod`] and [`crate::status`].
//!
//! Allocation safety rests on three layers:
//! 1. Placements in this process run one at a time under a mutex, over the cache plus an
//!    overlay of allocations written but not yet seen in the cache.
//! 2. The allocation is written into the machine's `status` with a `resourceVersion`
//!    precondition, so a reconcile working from a stale copy of the machine fails with
//!    a conflict and retries instead of writing over a newer decision.
//! 3. Before the Pod is created, a fresh (quorum) list of the machines on that node is
//!    checked: if another machine holds one of the same devices, this machine gives its
//!    allocation back and retries. Since each side reads after its own write, at most one
//!    of two racing machines can pass the check, whatever replicas or caches are involved.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use gpuvm_api::{GpuMachine, GpuMachineStatus, GpuNode, MachinePhase, keys};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Mutex;
use tracing::{Instrument, debug, info, instrument, warn};

use crate::inventory::{self, machine_key};
use crate::metrics::{KindLabel, Metrics};
use crate::pod::{PodError, build_pod};
use crate::scheduler::{Inventory, PlacementRequest};
use crate::status::{self, PodAction, Severity};

/// Label on a placed machine naming its node, so the pre-Pod check can list just the
/// machines of one node.
pub const LABEL_NODE: &str = "gpuvm.dev/node";

/// Everything that can fail in a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[source] kube::Error),
    /// Another writer got there first (a 409, or another machine holds a device).
    #[error("allocation conflict: {0}")]
    Conflict(String),
    /// The machine's Pods are still terminating; the GPUs are released after.
    #[error("waiting for the Pods of {0} to terminate before releasing its GPUs")]
    PodsTerminating(String),
    /// The Pod could not be built.
    #[error(transparent)]
    Pod(#[from] PodError),
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(status) if status.is_conflict() => {
                Error::Conflict(status.message.clone())
            }
            _ => Error::Kube(e),
        }
    }
}

impl Error {
    /// The `kind` label of the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Conflict(_) => "conflict",
            Error::PodsTerminating(_) => "pods_terminating",
            Error::Pod(_) => "pod",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
        }
    }

    /// How long to wait before retrying after this error.
    pub fn backoff(&self) -> Duration {
        match self.metric_label() {
            // Someone else wrote first: re-read and retry almost at once.
            "conflict" => Duration::from_millis(200),
            "pods_terminating" => Duration::from_secs(2),
            // A Pod that can't be built won't be buildable until the spec changes.
            "pod" => Duration::from_secs(300),
            _ => Duration::from_secs(10),
        }
    }
}

/// Tunables of the controller.
#[derive(Clone, Debug)]
pub struct Settings {
    /// A GpuNode whose heartbeat is older than this is treated as not ready.
    pub heartbeat_timeout: Duration,
    /// How often an unschedulable machine is retried even without a trigger.
    pub unschedulable_retry: Duration,
    /// Periodic resync of a healthy machine.
    pub resync: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat_timeout: Duration::from_secs(120),
            unschedulable_retry: Duration::from_secs(30),
            resync: Duration::from_secs(300),
        }
    }
}

/// A dirty index is rebuilt no more often than this: heartbeats arrive constantly on a
/// large fleet, and a second-old view of readiness is good enough to rank nodes (it is
/// never what keeps a GPU from being given twice: see the module docs).
pub const INDEX_REBUILD_MIN: Duration = Duration::from_secs(1);
/// Even when nothing signalled a change, the index is rebuilt this often.
pub const INDEX_MAX_AGE: Duration = Duration::from_secs(30);

/// What placement keeps between reconciles.
#[derive(Debug, Default)]
pub struct Placer {
    /// Allocations written by this process, keyed `namespace/name`, until the cache
    /// shows them.
    pub overlay: HashMap<String, (String, Vec<String>)>,
    /// The scheduler's index of the fleet, with every allocation committed so far.
    index: Option<(Inventory, Instant)>,
}

/// Shared state of the reconcilers.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Cache of every GpuMachine.
    pub machines: Store<GpuMachine>,
    /// Cache of every GpuNode.
    pub gpu_nodes: Store<GpuNode>,
    /// Cache of every Node.
    pub nodes: Store<Node>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Tunables.
    pub settings: Settings,
    /// Placement state; holding the lock serializes placements in this process.
    pub placer: Mutex<Placer>,
    /// Set when the inventory may have changed (a GpuNode or Node event, GPUs released):
    /// the cached index is then rebuilt, at most once per [`INDEX_REBUILD_MIN`].
    pub inventory_dirty: AtomicBool,
    /// Told whenever GPUs are released, so machines waiting for GPUs are retried now
    /// rather than at their next periodic retry.
    released: tokio::sync::mpsc::UnboundedSender<()>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context over the given caches.
    pub fn new(
        client: Client,
        machines: Store<GpuMachine>,
        gpu_nodes: Store<GpuNode>,
        nodes: Store<Node>,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: keys::FIELD_MANAGER.to_owned(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Context {
            client,
            machines,
            gpu_nodes,
            nodes,
            recorder,
            metrics,
            settings,
            placer: Mutex::new(Placer::default()),
            inventory_dirty: AtomicBool::new(true),
            released: tokio::sync::mpsc::unbounded_channel().0,
        }
    }

    /// Routes "GPUs were released" to `tx` (the controller's trigger for waiting machines).
    pub fn with_release_notifier(mut self, tx: tokio::sync::mpsc::UnboundedSender<()>) -> Self {
        self.released = tx;
        self
    }

    /// Records that GPUs were released: the index is rebuilt and waiting machines retried.
    pub fn gpus_released(&self) {
        self.inventory_dirty.store(true, Ordering::Relaxed);
        // Nobody listening (tests) is fine.
        let _ = self.released.send(());
    }

    async fn publish(&self, machine: &GpuMachine, severity: Severity, reason: &str, note: &str) {
        let event = Event {
            type_: match severity {
                Severity::Normal => EventType::Normal,
                Severity::Warning => EventType::Warning,
            },
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        // Events are best effort: a failure to record one must not fail the reconcile.
        if let Err(e) = self
            .recorder
            .publish(&event, &machine.object_ref(&()))
            .await
        {
            warn!(error = %e, "could not publish event");
        }
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Reconciles one machine: finalizer, placement, Pod, status.
#[instrument(skip(machine, ctx), fields(machine = %machine_key(&machine)))]
pub async fn reconcile(machine: Arc<GpuMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = machine.namespace().unwrap_or_default();
    let api: Api<GpuMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, keys::FINALIZER, machine, |event| async {
        match event {
            Finalizer::Apply(m) => apply(&m, &ctx).await,
            Finalizer::Cleanup(m) => cleanup(&m, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&KindLabel { kind: label.into() })
        .inc();
    result
}

/// Requeue policy: by error kind.
pub fn error_policy(machine: Arc<GpuMachine>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .errors
        .get_or_create(&KindLabel {
            kind: error.metric_label().into(),
        })
        .inc();
    match error.metric_label() {
        "conflict" | "pods_terminating" => {
            debug!(machine = %machine_key(&machine), %error, "retrying")
        }
        _ => warn!(machine = %machine_key(&machine), %error, "reconcile failed"),
    }
    Action::requeue(error.backoff())
}

async fn apply(machine: &GpuMachine, ctx: &Context) -> Result<Action, Error> {
    let placed = machine
        .status
        .as_ref()
        .is_some_and(GpuMachineStatus::is_placed);
    if !placed {
        return place(machine, ctx).await;
    }
    let ns = machine.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let status = machine.status.clone().unwrap_or_default();
    let pod_name = crate::pod::pod_name(&machine.name_any(), status.restarts);
    let pod = pods.get_opt(&pod_name).await?;
    let decision = status::decide(machine, pod.as_ref(), &now());

    match decision.action {
        PodAction::Create => {
            if !verify_exclusive(machine, ctx).await? {
                return Ok(Action::requeue(jitter(Duration::from_millis(500))));
            }
            let pod = build_pod(&GpuMachine {
                status: Some(decision.status.clone()),
                ..machine.clone()
            })?;
            match pods.create(&PostParams::default(), &pod).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_already_exists() => {}
                Err(e) => return Err(e.into()),
            }
            info!(pod = %pod.name_any(), "created Pod");
            ctx.publish(
                machine,
                Severity::Normal,
                "PodCreated",
                &format!("created Pod {}", pod.name_any()),
            )
            .await;
        }
        PodAction::DeleteForRestart | PodAction::DeleteFinished => {
            if let Some(p) = &pod {
                delete_pod(&pods, &p.name_any()).await?;
            }
        }
        PodAction::Nothing => {}
    }

    if decision.status != status {
        write_status(machine, &decision.status, ctx).await?;
        if !inventory::holds_gpus(&GpuMachine {
            status: Some(decision.status.clone()),
            ..machine.clone()
        }) {
            // The machine ended and its Pod is gone: its GPUs are free again.
            ctx.gpus_released();
        }
        for note in &decision.notes {
            info!(reason = %note.reason, "{}", note.message);
            ctx.publish(machine, note.severity, &note.reason, &note.message)
                .await;
        }
    }
    Ok(match decision.status.phase {
        Some(p) if p.is_terminal() && decision.status.pod_name.is_none() => Action::await_change(),
        Some(MachinePhase::Running) => Action::requeue(ctx.settings.resync),
        // Pods move on their own; the Pod watch wakes us, this is a safety net.
        _ => Action::requeue(Duration::from_secs(30)),
    })
}

/// Chooses GPUs for an unplaced machine and records the allocation in its status.
async fn place(machine: &GpuMachine, ctx: &Context) -> Result<Action, Error> {
    let started = Instant::now();
    let key = machine_key(machine);
    let ns = machine.namespace().unwrap_or_default();
    let api: Api<GpuMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let mut guard = ctx.placer.lock().await;
    let placer = &mut *guard;

    let stale = match &placer.index {
        None => true,
        Some((_, built)) => {
            built.elapsed() >= INDEX_MAX_AGE
                || (built.elapsed() >= INDEX_REBUILD_MIN
                    && ctx.inventory_dirty.load(Ordering::Relaxed))
        }
    };
    if stale {
        ctx.inventory_dirty.store(false, Ordering::Relaxed);
        let machines = ctx.machines.state();
        // The cache may now show what the overlay remembered: drop entries it confirms.
        placer.overlay.retain(|k, (node, _)| {
            !machines.iter().any(|m| {
                machine_key(m) == *k
                    && m.status.as_ref().and_then(|s| s.node_name.as_ref()) == Some(node)
            })
        });
        let views = inventory::node_views(
            ctx.gpu_nodes.state().iter().map(|g| g.as_ref()),
            ctx.nodes.state().iter().map(|n| n.as_ref()),
            Timestamp::now(),
            ctx.settings.heartbeat_timeout,
        );
        let allocations =
            inventory::allocations(machines.iter().map(|m| m.as_ref()), &placer.overlay, &key);
        placer.index = Some((Inventory::build(&views, &allocations), Instant::now()));
    }
    let Some((inv, _)) = placer.index.as_mut() else {
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let request = PlacementRequest::from(&machine.spec);
    let result = inv.place(&request);

    match result {
        Err(why) => {
            ctx.metrics.set_usage(&inv.usage_by_model());
            drop(guard);
            let message = why.to_string();
            let status = status::unschedulable(machine, why.reason(), &message, &now());
            let changed = machine.status.as_ref().and_then(|s| s.message.as_deref())
                != Some(message.as_str());
            if changed {
                write_status(machine, &status, ctx).await?;
                info!(%message, "machine is unschedulable");
                ctx.publish(machine, Severity::Warning, "FailedScheduling", &message)
                    .await;
            }
            Ok(Action::requeue(ctx.settings.unschedulable_retry))
        }
        Ok(placement) => {
            // The node label lets the pre-Pod check list one node's machines.
            let labelled = api
                .patch(
                    &machine.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({
                        "metadata": {
                            "labels": { LABEL_NODE: placement.node },
                            "resourceVersion": machine.resource_version(),
                        }
                    })),
                )
                .await?;
            let mut status = machine.status.clone().unwrap_or_default();
            status.node_name = Some(placement.node.clone());
            status.gpus = placement.gpus.clone();
            status.phase = Some(MachinePhase::Scheduled);
            let gpus = placement.gpus.len();
            let model = placement
                .gpus
                .first()
                .map(|g| g.model.clone())
                .unwrap_or_default();
            let message = format!(
                "{gpus} x {model} on node {} ({})",
                placement.node,
                placement.devices().join(", ")
            );
            status.message = Some(message.clone());
            let generation = machine.metadata.generation.unwrap_or_default();
            status.observed_generation = Some(generation);
            status::set_condition(
                &mut status.conditions,
                gpuvm_api::ConditionType::Scheduled,
                "True",
                "Scheduled",
                &message,
                generation,
                &now(),
            );
            // Optimistic write: fails with 409 if the machine changed since we read it.
            write_status(&labelled, &status, ctx).await?;
            placer
                .overlay
                .insert(key, (placement.node.clone(), placement.devices()));
            inv.commit(&placement);
            ctx.metrics.set_usage(&inv.usage_by_model());
            drop(guard);
            ctx.metrics
                .placement_seconds
                .observe(started.elapsed().as_secs_f64());
            info!(node = %placement.node, devices = ?placement.devices(), "allocated GPUs");
            ctx.publish(machine, Severity::Normal, "Scheduled", &message)
                .await;
            Ok(Action::requeue(Duration::from_millis(1)))
        }
    }
}

/// Checks, with a fresh read, that no other machine on this machine's node holds any of
/// its devices. On a clash this machine gives its allocation back and returns `false`.
async fn verify_exclusive(machine: &GpuMachine, ctx: &Context) -> Result<bool, Error> {
    let status = machine.status.clone().unwrap_or_default();
    let Some(node) = status.node_name.clone() else {
        return Ok(false);
    };
    let mine: std::collections::HashSet<String> = status.devices().into_iter().collect();
    let all: Api<GpuMachine> = Api::all(ctx.client.clone());
    let on_node = all
        .list(&ListParams::default().labels(&format!("{LABEL_NODE}={node}")))
        .await?;
    let me = machine_key(machine);
    let clash = on_node.items.iter().find(|other| {
        machine_key(other) != me
            && inventory::holds_gpus(other)
            && other.status.as_ref().is_some_and(|s| {
                s.node_name.as_deref() == Some(node.as_str())
                    && s.devices().iter().any(|d| mine.contains(d))
            })
    });
    let Some(other) = clash else {
        return Ok(true);
    };
    warn!(other = %machine_key(other), "another machine holds the same GPUs; giving the allocation back");
    let mut released = status.clone();
    released.node_name = None;
    released.gpus.clear();
    released.phase = Some(MachinePhase::Pending);
    released.message = Some(format!(
        "allocation clashed with {}; placing again",
        machine_key(other)
    ));
    write_status(machine, &released, ctx).await?;
    ctx.placer.lock().await.overlay.remove(&me);
    ctx.gpus_released();
    ctx.publish(
        machine,
        Severity::Warning,
        "AllocationConflict",
        released.message.as_deref().unwrap_or_default(),
    )
    .await;
    Ok(false)
}

/// Writes the whole status by server-side apply, with the machine's resourceVersion as
/// a precondition so a stale writer gets a 409 instead of overwriting.
async fn write_status(
    machine: &GpuMachine,
    status: &GpuMachineStatus,
    ctx: &Context,
) -> Result<GpuMachine, Error> {
    let ns = machine.namespace().unwrap_or_default();
    let api: Api<GpuMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "apiVersion": "gpuvm.dev/v1alpha1",
        "kind": "GpuMachine",
        "metadata": { "resourceVersion": machine.resource_version() },
        "status": status,
    });
    let pp = PatchParams::apply(keys::FIELD_MANAGER).force();
    Ok(api
        .patch_status(&machine.name_any(), &pp, &Patch::Apply(patch))
        .await?)
}

/// Finalizer cleanup: delete the machine's Pods, wait until they are gone, then let the
/// finalizer go, which releases the GPUs.
async fn cleanup(machine: &GpuMachine, ctx: &Context) -> Result<Action, Error> {
    let ns = machine.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!("{}={}", keys::LABEL_MACHINE, machine.name_any());
    let remaining = pods.list(&ListParams::default().labels(&selector)).await?;
    if remaining.items.is_empty() {
        ctx.placer
            .lock()
            .await
            .overlay
            .remove(&machine_key(machine));
        ctx.gpus_released();
        info!("released GPUs");
        return Ok(Action::await_change());
    }
    if machine.phase() != MachinePhase::Terminating {
        let mut status = machine.status.clone().unwrap_or_default();
        status.phase = Some(MachinePhase::Terminating);
        status.message = Some("deleting the Pod; GPUs are released once it is gone".to_owned());
        write_status(machine, &status, ctx).await?;
        ctx.publish(
            machine,
            Severity::Normal,
            "Terminating",
            "deleting the machine's Pod",
        )
        .await;
    }
    for pod in &remaining.items {
        if pod.metadata.deletion_timestamp.is_none() {
            delete_pod(&pods, &pod.name_any()).await?;
        }
    }
    Err(Error::PodsTerminating(machine_key(machine)))
}

/// Deletes a Pod; one that is already gone is not an error.
async fn delete_pod(pods: &Api<Pod>, name: &str) -> Result<(), Error> {
    match pods.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn jitter(base: Duration) -> Duration {
    // Enough randomness to break lock-step retries between replicas, without a crate.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base + Duration::from_millis(u64::from(nanos % 500))
}

/// Starts the caches and runs the controller until shutdown.
pub async fn run(client: Client, metrics: Arc<Metrics>, settings: Settings) {
    let machines_api: Api<GpuMachine> = Api::all(client.clone());
    let gpu_nodes_api: Api<GpuNode> = Api::all(client.clone());
    let nodes_api: Api<Node> = Api::all(client.clone());
    let pods_api: Api<Pod> = Api::all(client.clone());

    let (gpu_nodes, gn_writer) = reflector::store::<GpuNode>();
    let (nodes, node_writer) = reflector::store::<Node>();
    let gn_stream = reflector(
        gn_writer,
        watcher(gpu_nodes_api, watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    let node_stream = reflector(
        node_writer,
        watcher(nodes_api, watcher::Config::default()).modify(|n| {
            // Only labels, readiness and cordon matter here: keep the cache small.
            n.metadata.managed_fields = None;
            if let Some(s) = n.status.as_mut() {
                s.images = None;
            }
        }),
    )
    .default_backoff()
    .touched_objects();

    let controller = Controller::new(machines_api, watcher::Config::default().any_semantic());
    let machines = controller.store();
    let machines_ready = machines.clone();
    let (released_tx, released_rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            machines.clone(),
            gpu_nodes.clone(),
            nodes.clone(),
            metrics.clone(),
            settings,
        )
        .with_release_notifier(released_tx),
    );

    // Inventory changes (a GpuNode or Node) wake every machine still waiting for GPUs.
    let waiting = |store: Store<GpuMachine>, ctx: Arc<Context>| {
        move || {
            ctx.inventory_dirty.store(true, Ordering::Relaxed);
            store
                .state()
                .into_iter()
                .filter(|m| !m.status.as_ref().is_some_and(GpuMachineStatus::is_placed))
                .map(|m| ObjectRef::from_obj(m.as_ref()))
                .collect::<Vec<_>>()
        }
    };
    let on_gpu_node = waiting(machines.clone(), ctx.clone());
    let on_node = waiting(machines.clone(), ctx.clone());
    let on_release = waiting(machines.clone(), ctx.clone());
    let released =
        futures::stream::unfold((released_rx, on_release), |(mut rx, refs)| async move {
            rx.recv()
                .await
                .map(|()| (futures::stream::iter(refs()), (rx, refs)))
        })
        .flatten();

    let ready_metrics = metrics.clone();
    let readiness = async move {
        let (a, b, c) = tokio::join!(
            gpu_nodes.wait_until_ready(),
            nodes.wait_until_ready(),
            machines_ready.wait_until_ready()
        );
        if a.is_ok() && b.is_ok() && c.is_ok() {
            ready_metrics.set_ready(true);
            info!("caches synced; operator ready");
        }
    };
    tokio::spawn(readiness.instrument(tracing::info_span!("readiness")));

    controller
        .owns(
            pods_api,
            watcher::Config::default().labels(keys::LABEL_MACHINE),
        )
        .watches_stream(gn_stream, move |_: GpuNode| on_gpu_node())
        .watches_stream(node_stream, move |_: Node| on_node())
        .reconcile_on(released)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "reconcile loop");
            }
        })
        .await;
}
