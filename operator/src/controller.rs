//! The reconciler: the thin I/O layer around the pure decisions in [`crate::scheduler`],
//! [`crate::pod`] and [`crate::status`].
//!
//! Who owns a GPU is decided in one place: the node's [`GpuAllocation`] record, changed
//! only by an update carrying the resourceVersion that was read ([`crate::allocator`]).
//! Of two writers for one device exactly one commits; the other is refused, reads again
//! and places again, having taken nothing. A machine's `status` mirrors its committed
//! entries, written with the machine's own resourceVersion as a precondition, so when two
//! replicas place one machine on two nodes exactly one mirror wins and the loser gives
//! its record entries back. A Pod is created only right after the commit, or after a
//! quorum read shows the allocation still current; a Pod that disagrees with its
//! machine's committed allocation is deleted. Entries whose machine is gone, ended or
//! placed elsewhere are collected by [`collect_garbage`]. None of this depends on leader
//! election or on caches being fresh: a stale cache only costs a retry.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use gpuvm_api::{
    AllocatedGpu, GpuAllocation, GpuMachine, GpuMachineStatus, GpuNode, MachinePhase, MachineRef,
    keys,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PartialObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::Mutex;
use tracing::{Instrument, debug, info, instrument, warn};

use crate::allocator::{self, CommitError, Committer, Op, Outcome};
use crate::inventory::{self, machine_key};
use crate::metrics::{KindLabel, Metrics};
use crate::pod::{PodError, build_pod, current_pod_name, matches_allocation, owned_by};
use crate::scheduler::{Inventory, PlacementRequest};
use crate::status::{self, Backoff, PodAction, Severity};

/// Everything that can fail in a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[source] kube::Error),
    /// Another writer got there first (a 409 on the machine).
    #[error("allocation conflict: {0}")]
    Conflict(String),
    /// The node's allocation record could not be written.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// The machine's Pods are still terminating; the GPUs are released after.
    #[error("waiting for the Pods of {0} to terminate before releasing its GPUs")]
    PodsTerminating(String),
    /// The Pod could not be built.
    #[error(transparent)]
    Pod(#[from] PodError),
    /// The machine has no uid yet (it cannot own devices).
    #[error("machine {0} has no uid")]
    NoUid(String),
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
    /// The error a reconcile failed with, seen through the finalizer's wrapper.
    fn inner(&self) -> &Error {
        match self {
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.inner(),
                _ => self,
            },
            _ => self,
        }
    }

    /// The `kind` label of the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self.inner() {
            Error::Kube(_) => "kube",
            Error::Conflict(_) => "conflict",
            Error::Commit(CommitError::Contended(_)) => "conflict",
            Error::Commit(_) => "allocation_write",
            Error::PodsTerminating(_) => "pods_terminating",
            Error::Pod(_) => "pod",
            Error::NoUid(_) => "no_uid",
            Error::Finalizer(_) => "finalizer",
        }
    }

    /// How long to wait before retrying after this error.
    pub fn backoff(&self) -> Duration {
        match self.inner() {
            // Someone else wrote first: re-read and retry almost at once.
            Error::Conflict(_) | Error::Commit(CommitError::Contended(_)) => {
                jitter(Duration::from_millis(50))
            }
            Error::PodsTerminating(_) => Duration::from_secs(2),
            // A Pod that can't be built won't be buildable until the spec changes.
            Error::Pod(_) => Duration::from_secs(300),
            Error::NoUid(_) => Duration::from_secs(1),
            // An overloaded or briefly unreachable API server: soon, but not at once.
            Error::Kube(e) if is_transient(e) => jitter(Duration::from_secs(1)),
            _ => Duration::from_secs(10),
        }
    }

    /// Whether this is the routine outcome of racing another writer.
    fn is_routine(&self) -> bool {
        matches!(
            self.inner(),
            Error::Conflict(_)
                | Error::Commit(CommitError::Contended(_))
                | Error::PodsTerminating(_)
        )
    }
}

/// Tunables of the controller.
#[derive(Clone, Debug)]
pub struct Settings {
    /// A GpuNode whose heartbeat is older than this is treated as not ready.
    pub heartbeat_timeout: Duration,
    /// How often an unschedulable machine is retried even without a trigger.
    pub unschedulable_retry: Duration,
    /// How often a machine with a Pod is looked at even without an event (a safety net:
    /// the Pod watch wakes a machine whenever its Pod moves).
    pub resync: Duration,
    /// Back-off between restarts of a machine's Pod (kubelet's CrashLoopBackOff values
    /// by default; tests shorten them).
    pub restart_backoff: Backoff,
    /// When a node counts as lost and its machines are moved ([`crate::node_loss`]).
    pub node_loss: crate::node_loss::Policy,
    /// How many machines are reconciled at once (0: no limit).
    pub concurrency: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat_timeout: Duration::from_secs(120),
            unschedulable_retry: Duration::from_secs(30),
            resync: Duration::from_secs(300),
            restart_backoff: Backoff::default(),
            node_loss: crate::node_loss::Policy::default(),
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

/// Default bound on concurrent reconciles. Unbounded, a bulk apply put every machine's
/// requests on the wire at once: the API server queued them all (seconds per call), and
/// kube's HTTP/1.1 client opened a TLS connection per request in flight.
pub const DEFAULT_CONCURRENCY: u16 = 128;

/// A dirty index is rebuilt no more often than this: heartbeats arrive constantly on a
/// large fleet, and a second-old view of readiness is good enough to rank nodes (it is
/// never what keeps a GPU from being given twice: see the module docs).
pub const INDEX_REBUILD_MIN: Duration = Duration::from_secs(1);
/// Even when nothing signalled a change, the index is rebuilt this often.
pub const INDEX_MAX_AGE: Duration = Duration::from_secs(30);

/// The watched caches, for readiness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    /// GpuMachines.
    GpuMachine = 0,
    /// GpuNodes.
    GpuNode = 1,
    /// Nodes.
    Node = 2,
    /// GpuAllocation records.
    GpuAllocation = 3,
}

/// Which caches have completed their first list.
#[derive(Debug, Default)]
pub struct Synced([AtomicBool; 4]);

impl Synced {
    /// Marks a cache synced.
    pub fn set(&self, cache: Cache) {
        self.0[cache as usize].store(true, Ordering::Relaxed);
    }

    /// Whether every cache has completed its first list.
    pub fn all(&self) -> bool {
        self.0.iter().all(|f| f.load(Ordering::Relaxed))
    }

    /// A stream inspector that marks `cache` synced at its watcher's first `InitDone`.
    pub fn marker<K>(
        self: &Arc<Self>,
        cache: Cache,
    ) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) + use<K> {
        let this = self.clone();
        move |event| {
            if matches!(event, Ok(watcher::Event::InitDone)) {
                this.set(cache);
            }
        }
    }
}

/// How often record entries are checked against their machines.
pub const GC_PERIOD: Duration = Duration::from_secs(5);

/// What placement keeps between reconciles.
#[derive(Debug, Default)]
pub struct Placer {
    /// Claims chosen but not yet answered by the record, keyed by machine uid: node and
    /// devices. They count as taken when the index is rebuilt.
    pub pending: HashMap<String, (String, Vec<String>)>,
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
    /// Cache of every GpuAllocation record (may lag; the records themselves decide).
    pub allocations: Store<GpuAllocation>,
    /// Writes the records.
    pub committer: Committer,
    /// Who publishes Events. Each Event goes through a fresh [`Recorder`]: a shared one
    /// caches every Event it sent for six minutes (to count repeats) and scans that cache
    /// on every publish, which at 10,000 machines is megabytes and a quadratic cost for a
    /// count that only repeated warnings would use.
    pub reporter: Reporter,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Tunables.
    pub settings: Settings,
    /// Placement state; holding the lock serializes placements in this process.
    pub placer: Mutex<Placer>,
    /// Set when the inventory may have changed (a GpuNode or Node event, GPUs released):
    /// the cached index is then rebuilt, at most once per [`INDEX_REBUILD_MIN`].
    pub inventory_dirty: AtomicBool,
    /// Which caches have synced; placement waits for all of them.
    pub synced: Arc<Synced>,
    /// The resourceVersion of this process's last status write per machine uid: a cached
    /// machine older than that is a stale copy, not worth a reconcile.
    written: std::sync::Mutex<HashMap<String, u64>>,
    /// Pods this process created, by uid, with the resourceVersion the create answered
    /// with: the watch event that brings one back is this process's own echo, not news.
    /// An entry lives until the Pod's first event.
    created_pods: std::sync::Mutex<HashMap<String, String>>,
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
        allocations: Store<GpuAllocation>,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Self {
        let reporter = Reporter {
            controller: keys::FIELD_MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            committer: Committer::new(client.clone(), allocations.clone()),
            client,
            machines,
            gpu_nodes,
            nodes,
            allocations,
            reporter,
            metrics,
            settings,
            placer: Mutex::new(Placer::default()),
            inventory_dirty: AtomicBool::new(true),
            synced: Arc::new(Synced::default()),
            written: std::sync::Mutex::new(HashMap::new()),
            created_pods: std::sync::Mutex::new(HashMap::new()),
            released: tokio::sync::mpsc::unbounded_channel().0,
        }
    }

    /// Routes "GPUs were released" to `tx` (the controller's trigger for waiting machines).
    pub fn with_release_notifier(mut self, tx: tokio::sync::mpsc::UnboundedSender<()>) -> Self {
        self.released = tx;
        self
    }

    /// How `machine`'s version compares with what this process last wrote to it (`None`
    /// when it wrote nothing, or a version is unreadable).
    fn against_own_write(&self, machine: &GpuMachine) -> Option<std::cmp::Ordering> {
        let (uid, rv) = (machine.uid()?, rv_number(machine)?);
        let written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        written.get(&uid).map(|w| rv.cmp(w))
    }

    /// Whether `machine` is older than what this process last wrote to it.
    fn is_stale(&self, machine: &GpuMachine) -> bool {
        self.against_own_write(machine) == Some(std::cmp::Ordering::Less)
    }

    /// Whether a watch event of `machine` is news: not this process's own write coming
    /// back, nor a copy older than it. The reconcile that wrote has already asked for
    /// whatever comes next (its `Action`), so an echo would only repeat it, with one
    /// more read of the Pod.
    pub fn machine_event_is_news(&self, machine: &GpuMachine) -> bool {
        !matches!(
            self.against_own_write(machine),
            Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
        )
    }

    /// Notes a Pod this process created, so that its creation event is not taken for news.
    fn remember_pod(&self, pod: &Pod) {
        if let (Some(uid), Some(rv)) = (pod.uid(), pod.resource_version()) {
            let mut created = self.created_pods.lock().unwrap_or_else(|e| e.into_inner());
            created.insert(uid, rv);
        }
    }

    /// Whether a watch event of a Pod is news: anything but the first event of a Pod this
    /// process created, unchanged since.
    pub fn pod_event_is_news(&self, pod: &PartialObjectMeta<Pod>) -> bool {
        let Some(uid) = pod.metadata.uid.as_ref() else {
            return true;
        };
        let mut created = self.created_pods.lock().unwrap_or_else(|e| e.into_inner());
        created.remove(uid).as_ref() != pod.metadata.resource_version.as_ref()
    }

    fn remember_write(&self, machine: &GpuMachine) {
        if let (Some(uid), Some(rv)) = (machine.uid(), rv_number(machine)) {
            let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
            written.insert(uid, rv);
        }
    }

    fn forget(&self, uid: &str) {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        written.remove(uid);
    }

    /// Uses `synced` for cache readiness (the default starts with nothing synced).
    pub fn with_synced(mut self, synced: Arc<Synced>) -> Self {
        self.synced = synced;
        self
    }

    /// Records that GPUs were released: the index is rebuilt and waiting machines retried.
    pub fn gpus_released(&self) {
        self.inventory_dirty.store(true, Ordering::Relaxed);
        // Nobody listening (tests) is fine.
        let _ = self.released.send(());
    }

    /// Publishes an Event in the background: Events are best effort and must neither
    /// fail a reconcile nor add an API round trip to its latency.
    pub(crate) fn publish(
        &self,
        machine: &GpuMachine,
        severity: Severity,
        reason: &str,
        note: &str,
    ) {
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
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let reference = machine.object_ref(&());
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                warn!(error = %e, "could not publish event");
            }
        });
    }

    /// The newest known copy of every node's allocation record.
    fn known_records(&self) -> HashMap<String, Arc<GpuAllocation>> {
        allocator::newest_records(self.allocations.state(), self.committer.newest())
    }

    /// Submits a release of everything `uid` holds on `node`, and wakes waiting machines.
    pub(crate) async fn release(&self, node: &str, uid: &str) -> Result<(), Error> {
        self.committer
            .submit(
                node,
                Op::Release {
                    uid: uid.to_owned(),
                },
            )
            .await?;
        self.gpus_released();
        Ok(())
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Reconciles one machine: finalizer, placement, Pod, status.
#[instrument(skip(machine, ctx), fields(machine = %machine_key(&machine)))]
pub async fn reconcile(machine: Arc<GpuMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    if ctx.is_stale(&machine) {
        // Our own newer write is on its way through the watch; acting on this copy would
        // only meet a conflict. The echo triggers nothing (`machine_event_is_news`): look
        // again shortly, from the cache.
        return Ok(Action::requeue(STALE_RETRY));
    }
    let ns = machine.namespace().unwrap_or_default();
    let api: Api<GpuMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let result = match add_finalizer(&api, machine, &ctx).await {
        Ok(machine) => finalizer(&api, keys::FINALIZER, machine, |event| async {
            match event {
                Finalizer::Apply(m) => apply(&m, &ctx).await,
                Finalizer::Cleanup(m) => cleanup(&m, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e))),
        Err(e) => Err(e),
    };
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&KindLabel { kind: label.into() })
        .inc();
    result
}

/// Requeue policy: by error variant.
pub fn error_policy(machine: Arc<GpuMachine>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .errors
        .get_or_create(&KindLabel {
            kind: error.metric_label().into(),
        })
        .inc();
    if error.is_routine() {
        debug!(machine = %machine_key(&machine), %error, "retrying");
    } else {
        warn!(machine = %machine_key(&machine), %error, "reconcile failed");
    }
    Action::requeue(error.backoff())
}

/// The machine as an owner of devices.
fn owner(machine: &GpuMachine) -> Result<MachineRef, Error> {
    Ok(MachineRef {
        namespace: machine.namespace().unwrap_or_default(),
        name: machine.name_any(),
        uid: machine
            .uid()
            .ok_or_else(|| Error::NoUid(machine_key(machine)))?,
    })
}

/// A machine's resourceVersion as a number (etcd revisions), to compare copies.
fn rv_number(machine: &GpuMachine) -> Option<u64> {
    machine.resource_version()?.parse().ok()
}

/// Adds the finalizer to a live machine that lacks it and returns the machine as
/// written, so that placement goes on in this same reconcile instead of after the watch
/// brings the change back. The patch carries the resourceVersion read: a stale copy
/// gets a 409 (a conflict, retried at once) rather than the 422 of kube's `finalizer`
/// helper's JSON-patch test, which counted as a failed call and waited 10 s.
async fn add_finalizer(
    api: &Api<GpuMachine>,
    machine: Arc<GpuMachine>,
    ctx: &Context,
) -> Result<Arc<GpuMachine>, Error> {
    let present = machine.finalizers().iter().any(|f| f == keys::FINALIZER);
    if present || machine.metadata.deletion_timestamp.is_some() {
        return Ok(machine);
    }
    let mut finalizers = machine.finalizers().to_vec();
    finalizers.push(keys::FINALIZER.to_owned());
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": machine.resource_version()},
    });
    let mut written = ctx
        .metrics
        .timed(
            "finalizer",
            api.patch(
                &machine.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ),
        )
        .await?;
    ctx.remember_write(&written);
    inventory::trim_machine(&mut written);
    Ok(Arc::new(written))
}

async fn apply(machine: &GpuMachine, ctx: &Context) -> Result<Action, Error> {
    let placed = machine
        .status
        .as_ref()
        .is_some_and(GpuMachineStatus::is_placed);
    if !placed {
        return place(machine, ctx).await;
    }
    // A machine on a lost node is moved (or, pinned there, told to wait) first.
    if let Some(action) = crate::node_loss::check(machine, ctx).await? {
        return Ok(action);
    }
    run_placed(machine, ctx, false).await
}

/// A placed machine: its Pod, mirrored into status. `just_committed` says the allocation
/// in `machine.status` was committed to the record by this very reconcile, so it is
/// current without another read.
async fn run_placed(
    machine: &GpuMachine,
    ctx: &Context,
    just_committed: bool,
) -> Result<Action, Error> {
    let me = owner(machine)?;
    let ns = machine.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let status = machine.status.clone().unwrap_or_default();
    let node = status.node_name.clone().unwrap_or_default();
    let pod_name = current_pod_name(machine);
    let pod = if just_committed {
        None
    } else {
        ctx.metrics
            .timed("pod_get", pods.get_opt(&pod_name))
            .await?
    };
    if let Some(p) = &pod
        && owned_by(p, &me.uid)
        && p.metadata.deletion_timestamp.is_none()
        && !matches_allocation(p, &status)
    {
        warn!(pod = %p.name_any(), "the Pod disagrees with the machine's allocation; deleting it");
        delete_pod(&pods, &p.name_any()).await?;
        ctx.publish(
            machine,
            Severity::Warning,
            "PodMismatch",
            &format!(
                "deleted Pod {}: its node or devices differ from the allocation",
                p.name_any()
            ),
        );
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let backoff = &ctx.settings.restart_backoff;
    let mut decision = status::decide(machine, pod.as_ref(), backoff, &now());
    let mut wait = decision.wait;
    let mut written = false;

    match decision.action {
        PodAction::Create => {
            if !just_committed {
                // The GPUs are free only once every Pod this one replaces is gone (its
                // VM holds them): two VMs never wait for one device.
                let old = ctx
                    .metrics
                    .timed(
                        "pod_list",
                        replaced_pods(&pods, machine, &me.uid, &pod_name),
                    )
                    .await?;
                if !old.is_empty() {
                    return wait_for_replaced(machine, &decision.status, &pods, &old, ctx).await;
                }
                // Only an allocation the record still holds gets a Pod (a quorum read).
                let held = ctx
                    .metrics
                    .timed("record_read", ctx.committer.fresh_holdings(&node, &me.uid))
                    .await?;
                if AllocatedGpu::devices(&held) != status.devices() {
                    return mirror(machine, &node, held, ctx).await;
                }
            }
            let with = |status: &GpuMachineStatus| GpuMachine {
                status: Some(status.clone()),
                ..machine.clone()
            };
            let pod = build_pod(&with(&decision.status))?;
            let exists = create_pod(&pods, &pod, ctx).await?;
            if exists.is_none() {
                // The status written is the one the new Pod makes (Booting), as
                // `mirror` writes it: the Pod's own echo wakes nothing, so a status
                // saying "creating the Pod" would stand until the safety-net look.
                let created = status::decide(&with(&decision.status), Some(&pod), backoff, &now());
                decision.status = created.status;
                decision.notes.extend(created.notes);
            }
            wait = exists.or(wait);
        }
        action if action.deletes() => {
            // Crash-safe bookkeeping: the next Pod's name, the restart count and the
            // evidence are written (with the resourceVersion precondition) before the
            // old Pod is deleted, so a crash in between neither loses a restart nor
            // reuses a name; the old Pod is found and deleted by the next pass.
            write_status(machine, &decision.status, ctx).await?;
            publish_notes(machine, &decision.notes, ctx);
            written = true;
            if let Some(p) = &pod {
                delete_pod(&pods, &p.name_any()).await?;
                info!(pod = %p.name_any(), ?action, "deleted Pod");
            }
        }
        _ => {}
    }

    let ended = GpuMachine {
        status: Some(decision.status.clone()),
        ..machine.clone()
    };
    if !written && decision.status != status {
        write_status(machine, &decision.status, ctx).await?;
        publish_notes(machine, &decision.notes, ctx);
    }
    if !inventory::holds_gpus(&ended) {
        // The machine ended and its Pod is gone: its GPUs go back to the record.
        if record_holds(ctx, &node, &me.uid) {
            ctx.release(&node, &me.uid).await?;
            info!(%node, "released GPUs of the ended machine");
        }
    }
    Ok(match decision.status.phase {
        _ if wait.is_some() => Action::requeue(wait.unwrap_or_default()),
        Some(p) if p.is_terminal() && decision.status.pod_name.is_none() => Action::await_change(),
        _ => Action::requeue(ctx.settings.resync),
    })
}

/// How soon a reconcile that found its cached machine older than its own last write looks
/// again (the cache is a watch event behind; nothing is asked of the API server).
const STALE_RETRY: Duration = Duration::from_millis(200);

/// Creates a machine's Pod; `Some(wait)` when one of that name exists already (ours
/// from an earlier pass, or someone else's: a look after `wait` decides).
async fn create_pod(pods: &Api<Pod>, pod: &Pod, ctx: &Context) -> Result<Option<Duration>, Error> {
    let created = ctx
        .metrics
        .timed("pod_create", pods.create(&PostParams::default(), pod))
        .await;
    match created {
        Ok(created) => {
            ctx.remember_pod(&created);
            // No Event: `Scheduled` and the phase Events that follow say it, and each
            // Event is one more write on the API server's busiest path.
            info!(pod = %pod.name_any(), "created Pod");
            Ok(None)
        }
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(Some(Duration::from_secs(1))),
        Err(e) => Err(e.into()),
    }
}

fn publish_notes(machine: &GpuMachine, notes: &[status::Note], ctx: &Context) {
    for note in notes {
        info!(reason = %note.reason, "{}", note.message);
        ctx.publish(machine, note.severity, &note.reason, &note.message);
    }
}

/// The machine's own Pods other than `current` (read fresh): those a restart or a
/// roll-out replaced, which must be gone before `current` is created.
async fn replaced_pods(
    pods: &Api<Pod>,
    machine: &GpuMachine,
    uid: &str,
    current: &str,
) -> Result<Vec<Pod>, Error> {
    let selector = format!("{}={}", keys::LABEL_MACHINE, machine.name_any());
    let list = pods.list(&ListParams::default().labels(&selector)).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| owned_by(p, uid) && p.name_any() != current)
        .collect())
}

/// Deletes replaced Pods still running (left by a crash between the status write and
/// the delete) and says in status that the new Pod waits for them.
async fn wait_for_replaced(
    machine: &GpuMachine,
    decided: &GpuMachineStatus,
    pods: &Api<Pod>,
    old: &[Pod],
    ctx: &Context,
) -> Result<Action, Error> {
    for p in old {
        if p.metadata.deletion_timestamp.is_none() {
            info!(pod = %p.name_any(), "deleting a replaced Pod");
            delete_pod(pods, &p.name_any()).await?;
        }
    }
    let names: Vec<String> = old.iter().map(ResourceExt::name_any).collect();
    let mut status = decided.clone();
    status.message = Some(format!(
        "waiting for Pod {} to be gone before creating {} on the same GPUs",
        names.join(", "),
        status.pod_name.clone().unwrap_or_default()
    ));
    if machine.status.as_ref() != Some(&status) {
        write_status(machine, &status, ctx).await?;
    }
    // The Pod watch wakes us when they go; this is a safety net.
    Ok(Action::requeue(Duration::from_secs(2)))
}

/// Whether the newest known copy of `node`'s record lists anything of `uid` (when in
/// doubt, yes: a release of nothing costs one read).
fn record_holds(ctx: &Context, node: &str, uid: &str) -> bool {
    ctx.known_records()
        .get(node)
        .is_none_or(|r| r.spec.devices.values().any(|o| o.uid == uid))
}

/// Chooses GPUs for an unplaced machine, commits them to the node's record, mirrors the
/// record into the machine's status and creates the Pod.
/// Says in status (condition `Scheduled=False` with `reason`) and in a Warning Event
/// (`event`) why a machine is not placed, once per message.
async fn report_unplaced(
    machine: &GpuMachine,
    reason: &str,
    event: &str,
    message: &str,
    ctx: &Context,
) -> Result<(), Error> {
    let changed = machine.status.as_ref().and_then(|s| s.message.as_deref()) != Some(message);
    if changed {
        let status = status::unschedulable(machine, reason, message, &now());
        write_status(machine, &status, ctx).await?;
        info!(%message, "machine is not placed");
        ctx.publish(machine, Severity::Warning, event, message);
    }
    Ok(())
}

async fn place(machine: &GpuMachine, ctx: &Context) -> Result<Action, Error> {
    let started = Instant::now();
    let me = owner(machine)?;
    if !ctx.synced.all() {
        // Placing from half-filled caches would only meet refusals: wait for them.
        return Ok(Action::requeue(Duration::from_millis(100)));
    }

    // Already an owner (a crash between commit and mirror, or another replica's
    // commit)? Mirror that; never allocate twice.
    let mut held: Vec<(String, Vec<AllocatedGpu>)> = ctx
        .known_records()
        .into_iter()
        .map(|(node, r)| (node, r.spec.holdings(&me.uid)))
        .filter(|(_, h)| !h.is_empty())
        .collect();
    held.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some((node, gpus)) = held.into_iter().next() {
        info!(%node, "the record already gives this machine GPUs; mirroring them");
        return mirror(machine, &node, gpus, ctx).await;
    }
    // A spec the operator would build no Pod for (stored before the CRD's rules
    // refused it) takes no GPUs: it waits, unplaced, for a spec that passes.
    if let Err(refused) = machine.spec.check_workload() {
        let message = format!("the operator refuses this spec: {refused}");
        report_unplaced(machine, "SpecRefused", "SpecRefused", &message, ctx).await?;
        return Ok(Action::await_change());
    }

    let picked = {
        let mut guard = ctx.placer.lock().await;
        let placer = &mut *guard;
        let inv = refresh_index(placer, ctx);
        let result = inv.place(&PlacementRequest::from(&machine.spec));
        if let Ok(p) = &result {
            inv.commit(p);
        }
        ctx.metrics.set_usage(&inv.usage_by_model());
        if let Ok(p) = &result {
            placer
                .pending
                .insert(me.uid.clone(), (p.node.clone(), p.devices()));
        }
        result
    };
    let placement = match picked {
        Ok(p) => p,
        Err(why) => {
            let message = why.to_string();
            report_unplaced(machine, why.reason(), "FailedScheduling", &message, ctx).await?;
            return Ok(Action::requeue(ctx.settings.unschedulable_retry));
        }
    };

    // The compare-and-swap on the node's record decides.
    let claim = Op::Claim {
        owner: me.clone(),
        gpus: placement.gpus.clone(),
    };
    let outcome = ctx
        .metrics
        .timed("commit", ctx.committer.submit(&placement.node, claim))
        .await;
    {
        let mut placer = ctx.placer.lock().await;
        placer.pending.remove(&me.uid);
        match &outcome {
            Ok(Outcome::Held(h)) if AllocatedGpu::devices(h) == placement.devices() => {}
            // Someone else holds it: it stays taken in the index, which is rebuilt from
            // the records soon.
            Ok(Outcome::Clash(_)) => ctx.inventory_dirty.store(true, Ordering::Relaxed),
            // The record gave us what we already held, or nothing was written.
            Ok(_) | Err(_) => {
                if let Some((inv, _)) = placer.index.as_mut() {
                    inv.release(&placement);
                }
                ctx.inventory_dirty.store(true, Ordering::Relaxed);
            }
        }
    }
    let gpus = match outcome? {
        Outcome::Held(gpus) => gpus,
        Outcome::Clash(clash) => {
            debug!(node = %placement.node, %clash, "lost the device to another writer; placing again");
            return Ok(Action::requeue(jitter(Duration::from_millis(20))));
        }
        Outcome::Released => return Ok(Action::requeue(Duration::from_millis(20))),
    };
    let action = mirror(machine, &placement.node, gpus, ctx).await?;
    ctx.metrics
        .placement_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(action)
}

/// Rebuilds the scheduler's index when it is stale, from the newest known records plus
/// this process's claims still in flight, and returns it.
fn refresh_index<'a>(placer: &'a mut Placer, ctx: &Context) -> &'a mut Inventory {
    let stale = match &placer.index {
        None => true,
        Some((_, built)) => {
            built.elapsed() >= INDEX_MAX_AGE
                || (built.elapsed() >= INDEX_REBUILD_MIN
                    && ctx.inventory_dirty.load(Ordering::Relaxed))
        }
    };
    if stale {
        placer.index = None;
    }
    let pending = &placer.pending;
    let (inv, _) = placer.index.get_or_insert_with(|| {
        ctx.inventory_dirty.store(false, Ordering::Relaxed);
        let views = inventory::node_views(
            ctx.gpu_nodes.state().iter().map(|g| g.as_ref()),
            ctx.nodes.state().iter().map(|n| n.as_ref()),
            Timestamp::now(),
            ctx.settings.heartbeat_timeout,
        );
        let records = ctx.known_records();
        let allocations = inventory::taken(records.values().map(AsRef::as_ref), pending.values());
        (Inventory::build(&views, &allocations), Instant::now())
    });
    inv
}

/// Writes the record's view of this machine (`gpus` on `node`, or nothing) into its
/// status, with the machine's resourceVersion as a precondition, and goes on with the
/// Pod. If another writer mirrored a different allocation first, ours on `node` is given
/// back.
async fn mirror(
    machine: &GpuMachine,
    node: &str,
    gpus: Vec<AllocatedGpu>,
    ctx: &Context,
) -> Result<Action, Error> {
    let me = owner(machine)?;
    let mut status = machine.status.clone().unwrap_or_default();
    if gpus.is_empty() {
        // The record holds nothing for this machine: it is not placed.
        warn!(%node, "the record no longer holds this machine's GPUs; placing it again");
        status.node_name = None;
        status.gpus.clear();
        status.pod_name = None;
        status.phase = Some(MachinePhase::Pending);
        status.message = Some("the allocation was not current; placing again".to_owned());
        write_status(machine, &status, ctx).await?;
        return Ok(Action::requeue(Duration::from_millis(20)));
    }
    let devices = AllocatedGpu::devices(&gpus);
    let model = gpus.first().map(|g| g.model.clone()).unwrap_or_default();
    let message = format!(
        "{} x {model} on node {node} ({})",
        gpus.len(),
        devices.join(", ")
    );
    status.node_name = Some(node.to_owned());
    status.gpus = gpus;
    status.phase = Some(MachinePhase::Scheduled);
    status.message = Some(message.clone());
    let generation = machine.metadata.generation.unwrap_or_default();
    // No observedGeneration here: it advances once a Pod runs this generation.
    status::set_condition(
        &mut status.conditions,
        gpuvm_api::ConditionType::Scheduled,
        "True",
        "Scheduled",
        &message,
        generation,
        &now(),
    );
    // The Pod's name goes into the same write: until the Pod exists, a later reconcile
    // finds it missing and creates it.
    let with = |status: &GpuMachineStatus| GpuMachine {
        status: Some(status.clone()),
        ..machine.clone()
    };
    let backoff = &ctx.settings.restart_backoff;
    let decided = status::decide(&with(&status), None, backoff, &now());
    // The Pod is built first and the status written as the Pod will make it (Booting):
    // one status write per placement instead of one before the Pod and one after, which
    // also cost a read of the Pod. Should the create fail, the next pass finds no Pod
    // and says so.
    let pod = match decided.action {
        PodAction::Create => Some(build_pod(&with(&decided.status))?),
        _ => None,
    };
    let status = match &pod {
        Some(p) => status::decide(&with(&decided.status), Some(p), backoff, &now()).status,
        None => decided.status,
    };
    match write_status(machine, &status, ctx).await {
        Ok(written) => {
            info!(%node, ?devices, "allocated GPUs");
            ctx.publish(machine, Severity::Normal, "Scheduled", &message);
            match pod {
                Some(pod) => {
                    let pods = Api::namespaced(ctx.client.clone(), &me.namespace);
                    let wait = create_pod(&pods, &pod, ctx).await?;
                    Ok(Action::requeue(wait.unwrap_or(ctx.settings.resync)))
                }
                None => Box::pin(run_placed(&written, ctx, true)).await,
            }
        }
        Err(Error::Conflict(_)) => {
            // The machine changed since we read it: look at it afresh.
            let ns = machine.namespace().unwrap_or_default();
            let api: Api<GpuMachine> = Api::namespaced(ctx.client.clone(), &ns);
            let now_there = api.get_opt(&machine.name_any()).await?;
            let same_machine = now_there
                .as_ref()
                .filter(|m| m.uid() == Some(me.uid.clone()));
            let mirrored_here = same_machine
                .and_then(|m| m.status.as_ref())
                .filter(|s| s.is_placed())
                .map(|s| s.node_name.as_deref() == Some(node) && s.devices() == devices);
            match mirrored_here {
                // Another replica mirrored the same allocation: nothing to undo.
                Some(true) => Ok(Action::requeue(Duration::from_millis(1))),
                // Unplaced still: retry the mirror on the new version.
                None if same_machine
                    .is_some_and(|m| !m.status.as_ref().is_some_and(|s| s.is_placed())) =>
                {
                    Ok(Action::requeue(Duration::from_millis(1)))
                }
                // Placed elsewhere by another writer, or gone: give ours back.
                _ => {
                    info!(%node, "another writer placed this machine first; releasing our claim");
                    ctx.release(node, &me.uid).await?;
                    Ok(Action::requeue(Duration::from_millis(1)))
                }
            }
        }
        Err(e) => Err(e),
    }
}

/// Writes the whole status with an update of the status subresource carrying the
/// machine's resourceVersion, so a stale writer gets a 409 instead of overwriting. An
/// update, not a server-side apply: the operator owns the whole status, and an apply
/// costs the API server a managed-fields merge on the busiest path of placement.
pub(crate) async fn write_status(
    machine: &GpuMachine,
    status: &GpuMachineStatus,
    ctx: &Context,
) -> Result<GpuMachine, Error> {
    let ns = machine.namespace().unwrap_or_default();
    let api: Api<GpuMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let mut object = GpuMachine {
        status: Some(status.clone()),
        ..machine.clone()
    };
    // Only the status and the version travel; the rest of the object is ignored there.
    object.metadata.managed_fields = None;
    let written = ctx
        .metrics
        .timed(
            "status",
            api.replace_status(&machine.name_any(), &PostParams::default(), &object),
        )
        .await?;
    ctx.remember_write(&written);
    Ok(written)
}

/// Finalizer cleanup: delete the machine's Pods, wait until they are gone, then give its
/// devices back in every record that lists them, and let the finalizer go.
async fn cleanup(machine: &GpuMachine, ctx: &Context) -> Result<Action, Error> {
    let ns = machine.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!("{}={}", keys::LABEL_MACHINE, machine.name_any());
    let mut remaining = pods.list(&ListParams::default().labels(&selector)).await?;
    // Only the machine's own Pods are deleted and waited for: a Pod that merely carries
    // its label (another machine's of the same name, or someone else's) is not ours.
    let uid = machine.uid().unwrap_or_default();
    remaining.items.retain(|p| owned_by(p, &uid));
    if remaining.items.is_empty() {
        if let Some(uid) = machine.uid() {
            let mut nodes: Vec<String> = ctx
                .known_records()
                .into_iter()
                .filter(|(_, r)| r.spec.devices.values().any(|o| o.uid == uid))
                .map(|(n, _)| n)
                .collect();
            if let Some(n) = machine.status.as_ref().and_then(|s| s.node_name.clone())
                && !nodes.contains(&n)
            {
                nodes.push(n);
            }
            for node in nodes {
                ctx.release(&node, &uid).await?;
            }
        }
        info!("released GPUs");
        if let Some(uid) = machine.uid() {
            ctx.forget(&uid);
        }
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
        );
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

/// What a record entry's owner says about it, read fresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryVerdict {
    /// The machine exists, is unplaced or placed on this node, and not ended: keep.
    Keep,
    /// The machine is gone (and its Pods too), ended without a Pod, or placed on
    /// another node: the entry is garbage.
    Release,
}

/// Decides about one record entry from a fresh read of its machine (`None`: no machine
/// of that name) and whether any of its Pods remain. Pure.
pub fn judge_entry(
    node: &str,
    uid: &str,
    machine: Option<&GpuMachine>,
    pods_remain: bool,
) -> EntryVerdict {
    let Some(m) = machine.filter(|m| m.uid().as_deref() == Some(uid)) else {
        // A Pod of a gone machine may still run a VM on the devices: wait for it.
        return if pods_remain {
            EntryVerdict::Keep
        } else {
            EntryVerdict::Release
        };
    };
    match m.status.as_ref().filter(|s| s.is_placed()) {
        // Unplaced: a commit whose mirror is in flight or was cut short; `place` adopts it.
        None => EntryVerdict::Keep,
        Some(s) if s.node_name.as_deref() != Some(node) => EntryVerdict::Release,
        Some(_) if !inventory::holds_gpus(m) && !pods_remain => EntryVerdict::Release,
        Some(_) => EntryVerdict::Keep,
    }
}

/// One pass over the records: entries whose machine no longer needs them go back.
/// Suspects are found in the caches and confirmed with fresh reads before anything is
/// released.
pub async fn collect_garbage(ctx: &Context) -> Result<usize, Error> {
    let machines: HashMap<String, Arc<GpuMachine>> = ctx
        .machines
        .state()
        .into_iter()
        .filter_map(|m| m.uid().map(|u| (u, m)))
        .collect();
    let mut released = 0;
    for (node, record) in ctx.known_records() {
        for owner in record.spec.owners() {
            let cached = machines.get(&owner.uid);
            if cached.is_some_and(|m| {
                judge_entry(&node, &owner.uid, Some(m), true) == EntryVerdict::Keep
            }) {
                continue;
            }
            let api: Api<GpuMachine> = Api::namespaced(ctx.client.clone(), &owner.namespace);
            let fresh = api.get_opt(&owner.name).await?;
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &owner.namespace);
            let selector = format!("{}={}", keys::LABEL_MACHINE, owner.name);
            let pods_remain = !pods
                .list(&ListParams::default().labels(&selector))
                .await?
                .items
                .is_empty();
            if judge_entry(&node, &owner.uid, fresh.as_ref(), pods_remain) == EntryVerdict::Release
            {
                info!(%node, machine = %owner, "releasing GPUs the machine no longer holds");
                ctx.release(&node, &owner.uid).await?;
                released += 1;
            }
        }
    }
    Ok(released)
}

/// Whether a failed call is worth retrying soon: the server was overloaded (429, 5xx)
/// or the connection failed, rather than the request being wrong.
fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        kube::Error::Service(_) | kube::Error::HyperError(_) => true,
        _ => false,
    }
}

fn jitter(base: Duration) -> Duration {
    // Enough randomness to break lock-step retries between replicas, without a crate.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base + Duration::from_millis(u64::from(nanos % 50))
}

/// Starts the caches and runs the controller until shutdown.
pub async fn run(client: Client, metrics: Arc<Metrics>, settings: Settings) {
    let machines_api: Api<GpuMachine> = Api::all(client.clone());
    let gpu_nodes_api: Api<GpuNode> = Api::all(client.clone());
    let nodes_api: Api<Node> = Api::all(client.clone());
    let allocations_api: Api<GpuAllocation> = Api::all(client.clone());

    let (gpu_nodes, gn_writer) = reflector::store::<GpuNode>();
    let (allocations, alloc_writer) = reflector::store::<GpuAllocation>();
    let synced = Arc::new(Synced::default());
    let alloc_stream = reflector(
        alloc_writer,
        watcher(allocations_api, watcher::Config::default()).modify(inventory::trim_managed_fields),
    )
    .inspect(synced.marker(Cache::GpuAllocation))
    .default_backoff()
    .touched_objects();
    let (nodes, node_writer) = reflector::store::<Node>();
    let gn_stream = reflector(
        gn_writer,
        watcher(gpu_nodes_api, watcher::Config::default()).modify(inventory::trim_managed_fields),
    )
    .inspect(synced.marker(Cache::GpuNode))
    .default_backoff()
    .touched_objects();
    let node_stream = reflector(
        node_writer,
        // Only labels, readiness and cordon matter here: keep the cache small.
        watcher(nodes_api, watcher::Config::default()).modify(inventory::trim_node),
    )
    .inspect(synced.marker(Cache::Node))
    .default_backoff()
    .touched_objects();

    let (machines, machine_writer) = reflector::store::<GpuMachine>();
    let machine_stream = reflector(
        machine_writer,
        watcher(machines_api, watcher::Config::default().any_semantic())
            .modify(inventory::trim_machine),
    )
    .inspect(synced.marker(Cache::GpuMachine))
    .default_backoff()
    .touched_objects();
    let concurrency = settings.concurrency;
    let (released_tx, released_rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            machines.clone(),
            gpu_nodes.clone(),
            nodes.clone(),
            allocations.clone(),
            metrics.clone(),
            settings,
        )
        .with_release_notifier(released_tx)
        .with_synced(synced.clone()),
    );
    // The watch brings back every write of this process; those echoes reconcile nothing
    // (the cache is updated all the same).
    let news = ctx.clone();
    let machine_stream =
        machine_stream.try_filter(move |m| futures::future::ready(news.machine_event_is_news(m)));
    let controller = Controller::for_stream(machine_stream, machines.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency));
    let news = ctx.clone();
    let pod_stream = watcher(
        Api::<PartialObjectMeta<Pod>>::all(client.clone()),
        watcher::Config::default().labels(keys::LABEL_MACHINE),
    )
    .default_backoff()
    .touched_objects()
    .try_filter(move |p| futures::future::ready(news.pod_event_is_news(p)));

    // Inventory changes (a GpuNode, Node or record) wake the machines waiting for GPUs:
    // those placement refused (`Scheduled=False`). A machine not yet tried is reconciled
    // by its own watch event; waking it on every record write as well (one per batch of
    // placements) multiplied the reconciles of a bulk apply by the number of nodes.
    let waiting = |store: Store<GpuMachine>, ctx: Arc<Context>| {
        move || {
            ctx.inventory_dirty.store(true, Ordering::Relaxed);
            store
                .state()
                .into_iter()
                .filter(|m| inventory::waits_for_gpus(m))
                .map(|m| ObjectRef::from_obj(m.as_ref()))
                .collect::<Vec<_>>()
        }
    };
    let on_gpu_node = waiting(machines.clone(), ctx.clone());
    let on_node = waiting(machines.clone(), ctx.clone());
    let on_record = waiting(machines.clone(), ctx.clone());
    let on_release = waiting(machines.clone(), ctx.clone());
    let released =
        futures::stream::unfold((released_rx, on_release), |(mut rx, refs)| async move {
            rx.recv()
                .await
                .map(|()| (futures::stream::iter(refs()), (rx, refs)))
        })
        .flatten();

    let ready_metrics = metrics.clone();
    // Readiness comes from flags set as each watch stream passes its first InitDone,
    // not from awaiting the stores: a store's readiness is a one-shot channel that keeps
    // only the last waiter's waker, and the controller's runner also awaits the GpuMachine
    // store, so a second waiter could sleep for ever. That is why a restarted operator
    // (whose caches fill while reconciles are already waiting) answered 503 "caches not
    // synced" until it was killed.
    let readiness = async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            if synced.all() {
                ready_metrics.set_ready(true);
                info!("caches synced; operator ready");
                return;
            }
        }
    };
    tokio::spawn(readiness.instrument(tracing::info_span!("readiness")));

    // Entries whose machine is gone, ended or placed elsewhere go back to the pool.
    let gc_ctx = ctx.clone();
    let garbage = async move {
        loop {
            tokio::time::sleep(GC_PERIOD).await;
            if !gc_ctx.synced.all() {
                continue;
            }
            match collect_garbage(&gc_ctx).await {
                Ok(0) => {}
                Ok(n) => info!(entries = n, "collected allocation garbage"),
                Err(e) => warn!(error = %e, "allocation garbage collection failed"),
            }
        }
    };
    tokio::spawn(garbage.instrument(tracing::info_span!("allocation_gc")));

    controller
        // Only the owner reference matters here: metadata alone, not whole Pods.
        .owns_stream(pod_stream)
        .watches_stream(gn_stream, move |_: GpuNode| on_gpu_node())
        .watches_stream(node_stream, move |_: Node| on_node())
        // A record another replica changed may have freed GPUs.
        .watches_stream(alloc_stream, move |_: GpuAllocation| on_record())
        .reconcile_on(released)
        // Machines on lost nodes (a stopped heartbeat sends no event: a sweep finds them).
        .reconcile_on(crate::node_loss::triggers(ctx.clone()))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "reconcile loop");
            }
        })
        .await;
}
