//! Node loss: a placed machine whose node is gone (its `Node` deleted), has been
//! NotReady for longer than a grace period, or whose `GpuNode` heartbeat has stopped for
//! longer than the heartbeat timeout plus that grace, is placed again on another node with
//! new GPUs. A machine the user pinned to its node with a `nodeSelector` on
//! `kubernetes.io/hostname` is not moved: it waits for the node, and says so.
//!
//! Moving a machine happens inside its own reconcile (so nothing else writes the machine
//! at the same time), in an order that any crash can resume:
//! 1. the machine's Pods are force-deleted (their node cannot confirm a graceful delete);
//! 2. its entry in the lost node's `GpuAllocation` record is released by the same
//!    compare-and-swap the allocator uses for every claim ([`crate::allocator`]), so the
//!    record never stops listing a device before the operator decided to free it;
//! 3. its status is cleared (unplaced, `Pending`) with the [`CONDITION`] condition saying
//!    which node was lost and why; placement then runs as for a new machine.
//!
//! A crash after 2 leaves a machine whose record holds nothing: the Pod path's quorum
//! read finds that and places it again. The lost node's devices are never given to
//! anyone while that node is not ready (placement skips nodes that are not ready), and
//! when it comes back its kubelet kills the VMs of the force-deleted Pods.
//!
//! The reconcile is triggered by a periodic sweep over the caches ([`triggers`]):
//! a stopped heartbeat is the absence of events, so no watch would report it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use gpuvm_api::{ConditionType, GpuMachine, GpuMachineStatus, GpuNode, MachinePhase, keys};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use tracing::{info, warn};

use crate::controller::{Context, Error};
use crate::status::{Severity, set_condition};

/// The condition type that records a lost node (`True` while the machine is affected,
/// `False` once it runs on a healthy node again).
pub const CONDITION: &str = "NodeLost";
/// The node label a `nodeSelector` pins a machine to one node with.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// Condition and Event reasons.
pub mod reasons {
    /// The node's `Node` object was deleted.
    pub const NODE_DELETED: &str = "NodeDeleted";
    /// The node was NotReady (or Unknown) for longer than the grace period.
    pub const NODE_NOT_READY: &str = "NodeNotReady";
    /// The node's `GpuNode` heartbeat stopped (or the `GpuNode` was deleted).
    pub const HEARTBEAT_LOST: &str = "GpuNodeHeartbeatLost";
    /// The Event reason when a machine's node is lost.
    pub const NODE_LOST: &str = "NodeLost";
    /// The condition reason (on `False`) once a moved machine was placed again.
    pub const REPLACED: &str = "Replaced";
    /// The condition reason (on `False`) once a pinned machine's node came back.
    pub const RECOVERED: &str = "NodeRecovered";
}

/// When a node counts as lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// How long a Node may be NotReady, or its GpuNode heartbeat stale, before its
    /// machines are moved.
    pub grace: Duration,
    /// Age after which a GpuNode heartbeat is stale (the node is then not ready for
    /// placement at once, and lost after `grace` more).
    pub heartbeat_timeout: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            // Kubernetes' default toleration of not-ready/unreachable nodes.
            grace: Duration::from_secs(300),
            heartbeat_timeout: Duration::from_secs(120),
        }
    }
}

impl Policy {
    /// How often the caches are swept for machines on lost nodes.
    pub fn sweep_period(&self) -> Duration {
        (self.grace.min(self.heartbeat_timeout) / 3)
            .clamp(Duration::from_secs(1), Duration::from_secs(10))
    }
}

/// Why a node counts as lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The `Node` is gone.
    NodeDeleted,
    /// The `Node` has not been Ready for this long.
    NotReady(Duration),
    /// The `GpuNode` heartbeat is this old (`None`: there is no `GpuNode` or heartbeat).
    HeartbeatLost(Option<Duration>),
}

impl Cause {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Cause::NodeDeleted => reasons::NODE_DELETED,
            Cause::NotReady(_) => reasons::NODE_NOT_READY,
            Cause::HeartbeatLost(_) => reasons::HEARTBEAT_LOST,
        }
    }

    /// "node X was deleted", as a phrase for messages.
    pub fn describe(&self, node: &str) -> String {
        match self {
            Cause::NodeDeleted => format!("node {node} was deleted"),
            Cause::NotReady(d) => format!("node {node} has not been Ready for {}s", d.as_secs()),
            Cause::HeartbeatLost(Some(d)) => format!(
                "the GpuNode of node {node} has not sent a heartbeat for {}s",
                d.as_secs()
            ),
            Cause::HeartbeatLost(None) => {
                format!("node {node} has no GpuNode heartbeat (the node agent is gone)")
            }
        }
    }
}

fn age(since: Timestamp, now: Timestamp) -> Duration {
    let secs = now.duration_since(since).as_secs_f64().max(0.0);
    Duration::from_secs_f64(secs)
}

/// Whether a node is lost, from its `Node` and `GpuNode` (`None`: not found; no `Node`
/// means it was deleted). Pure.
pub fn judge(
    node: Option<&Node>,
    gpu_node: Option<&GpuNode>,
    now: Timestamp,
    policy: &Policy,
) -> Option<Cause> {
    let Some(node) = node else {
        return Some(Cause::NodeDeleted);
    };
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status != "True" => {
            let since = c
                .last_transition_time
                .as_ref()
                .map(|t| t.0)
                .or_else(|| node.metadata.creation_timestamp.as_ref().map(|t| t.0));
            if let Some(since) = since {
                let down = age(since, now);
                if down > policy.grace {
                    return Some(Cause::NotReady(down));
                }
            }
        }
        // A Node that never reported readiness is new, not lost.
        _ => {}
    }
    let limit = policy.heartbeat_timeout + policy.grace;
    let beat = gpu_node
        .and_then(|g| g.status.as_ref())
        .and_then(|s| s.heartbeat.as_ref());
    match beat {
        Some(b) => {
            let stale = age(b.0, now);
            (stale > limit).then_some(Cause::HeartbeatLost(Some(stale)))
        }
        None => {
            // A GpuNode that never beat may be brand new: lost only once it is old.
            let created = gpu_node
                .and_then(|g| g.metadata.creation_timestamp.as_ref())
                .map(|t| t.0);
            match created {
                Some(c) if age(c, now) <= limit => None,
                _ => Some(Cause::HeartbeatLost(None)),
            }
        }
    }
}

/// Whether the user pinned the machine to `node`: its `nodeSelector` names the node's
/// `kubernetes.io/hostname` (the node name, or the label the Node carries, when known).
pub fn pinned_to(
    machine: &GpuMachine,
    node: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let Some(wanted) = machine.spec.node_selector.get(HOSTNAME_LABEL) else {
        return false;
    };
    wanted == node || labels.and_then(|l| l.get(HOSTNAME_LABEL)) == Some(wanted)
}

/// The machine's [`CONDITION`] condition, if any.
pub fn condition(status: &GpuMachineStatus) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == CONDITION)
}

/// Sets the [`CONDITION`] condition, keeping `lastTransitionTime` when its status is
/// unchanged.
pub fn set_node_lost(
    status: &mut GpuMachineStatus,
    state: &str,
    reason: &str,
    message: &str,
    generation: i64,
    now: &Time,
) {
    let new = Condition {
        type_: CONDITION.to_owned(),
        status: state.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: Some(generation),
        last_transition_time: now.clone(),
    };
    match status.conditions.iter_mut().find(|c| c.type_ == CONDITION) {
        Some(old) => {
            let since = if old.status == new.status {
                old.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            *old = Condition {
                last_transition_time: since,
                ..new
            };
        }
        None => status.conditions.push(new),
    }
}

/// What the node-loss check wants done with a placed machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The node is fine and nothing is recorded: go on with the Pod.
    Healthy,
    /// The node is fine again, but the condition still says lost: clear it.
    Clear {
        /// `Replaced` or `NodeRecovered`.
        reason: &'static str,
    },
    /// The node is lost and the machine pinned to it: record that it waits.
    Wait(Cause),
    /// The node is lost and the machine is pinned and already says so.
    Waiting,
    /// The node is lost: move the machine.
    Move(Cause),
}

/// Decides about a placed machine from what is known of its node (`cause`). Pure.
pub fn decide(
    machine: &GpuMachine,
    node: &str,
    cause: Option<Cause>,
    labels: Option<&BTreeMap<String, String>>,
) -> Verdict {
    if machine.phase().is_terminal() {
        // A machine that ended is done: moving it would run it again. Its GPUs go back
        // once its Pod is gone, as for any ended machine.
        return Verdict::Healthy;
    }
    let recorded = machine
        .status
        .as_ref()
        .and_then(condition)
        .filter(|c| c.status == "True");
    let pinned = pinned_to(machine, node, labels);
    match cause {
        None => match recorded {
            None => Verdict::Healthy,
            Some(_) if pinned => Verdict::Clear {
                reason: reasons::RECOVERED,
            },
            Some(_) => Verdict::Clear {
                reason: reasons::REPLACED,
            },
        },
        Some(cause) if pinned => {
            if recorded.is_some_and(|c| c.reason == cause.reason()) {
                Verdict::Waiting
            } else {
                Verdict::Wait(cause)
            }
        }
        Some(cause) => Verdict::Move(cause),
    }
}

/// What is known of a node: its cause of loss, if any, and its labels.
type NodeState = (Option<Cause>, Option<BTreeMap<String, String>>);

/// The cached view of `node`.
fn cached(ctx: &Context, node: &str, now: Timestamp) -> NodeState {
    let n = ctx.nodes.get(&ObjectRef::new(node));
    let g = ctx.gpu_nodes.get(&ObjectRef::new(node));
    let cause = judge(n.as_deref(), g.as_deref(), now, &ctx.settings.node_loss);
    (cause, n.map(|n| n.labels().clone()))
}

/// The node-loss check of a placed machine, called before its Pod is looked at.
/// `Some(action)`: this reconcile is done (the machine was moved, or its status
/// written); `None`: go on with the Pod.
pub async fn check(machine: &GpuMachine, ctx: &Context) -> Result<Option<Action>, Error> {
    let Some(status) = machine.status.as_ref().filter(|s| s.is_placed()) else {
        return Ok(None);
    };
    if !ctx.synced.all() {
        return Ok(None);
    }
    let node = status.node_name.clone().unwrap_or_default();
    let (cached_cause, labels) = cached(ctx, &node, Timestamp::now());
    let mut verdict = decide(machine, &node, cached_cause, labels.as_ref());
    if matches!(verdict, Verdict::Healthy | Verdict::Waiting) {
        return Ok(None);
    }
    if matches!(verdict, Verdict::Wait(_) | Verdict::Move(_)) {
        // Caches may lag (a Node re-created, a heartbeat just sent): decide on fresh reads.
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        let gpu_nodes: Api<GpuNode> = Api::all(ctx.client.clone());
        // A list by name, not a get: the operator's role may list and watch Nodes and
        // GpuNodes but not get them, and a list without a resourceVersion is a quorum read.
        let by_name = ListParams::default().fields(&format!("metadata.name={node}"));
        let fresh_node = nodes.list(&by_name).await?.items.into_iter().next();
        let fresh_gpu_node = gpu_nodes.list(&by_name).await?.items.into_iter().next();
        let cause = judge(
            fresh_node.as_ref(),
            fresh_gpu_node.as_ref(),
            Timestamp::now(),
            &ctx.settings.node_loss,
        );
        let labels = fresh_node.map(|n| n.labels().clone()).or(labels);
        verdict = decide(machine, &node, cause, labels.as_ref());
    }
    let now = Time(Timestamp::now());
    let generation = machine.metadata.generation.unwrap_or_default();
    match verdict {
        Verdict::Healthy | Verdict::Waiting => Ok(None),
        Verdict::Clear { reason } => {
            let mut status = status.clone();
            let before = condition(&status)
                .map(|c| c.message.clone())
                .unwrap_or_default();
            let message = if reason == reasons::RECOVERED {
                format!("node {node} is healthy again (before: {before})")
            } else {
                format!("now on node {node} (before: {before})")
            };
            set_node_lost(&mut status, "False", reason, &message, generation, &now);
            crate::controller::write_status(machine, &status, ctx).await?;
            info!(%node, reason, "the machine's node is healthy; cleared the NodeLost condition");
            Ok(Some(Action::requeue(Duration::from_millis(1))))
        }
        Verdict::Wait(cause) => {
            let message = format!(
                "{}; the machine is pinned to it by nodeSelector {HOSTNAME_LABEL} and waits for it to come back",
                cause.describe(&node)
            );
            let mut status = status.clone();
            set_node_lost(
                &mut status,
                "True",
                cause.reason(),
                &message,
                generation,
                &now,
            );
            status.message = Some(message.clone());
            crate::controller::write_status(machine, &status, ctx).await?;
            warn!(%node, reason = cause.reason(), "node lost; the machine is pinned to it and waits");
            ctx.publish(machine, Severity::Warning, reasons::NODE_LOST, &message);
            Ok(Some(Action::requeue(Duration::from_millis(1))))
        }
        Verdict::Move(cause) => move_machine(machine, status, &node, &cause, ctx)
            .await
            .map(Some),
    }
}

/// Moves a machine off its lost node: Pods force-deleted, record entry released by CAS,
/// status cleared with the reason. Each step is idempotent, so a retry resumes.
async fn move_machine(
    machine: &GpuMachine,
    status: &GpuMachineStatus,
    node: &str,
    cause: &Cause,
    ctx: &Context,
) -> Result<Action, Error> {
    let uid = machine
        .uid()
        .ok_or_else(|| Error::NoUid(crate::inventory::machine_key(machine)))?;
    let ns = machine.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!("{}={}", keys::LABEL_MACHINE, machine.name_any());
    // The lost node's kubelet cannot confirm a graceful delete: force it, or the Pod
    // (and with it the machine) would wait for ever. When the node comes back, its
    // kubelet kills the VM of a Pod that no longer exists.
    let force = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    for pod in pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        match pods.delete(&pod.name_any(), &force).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Only the operator's compare-and-swap takes a device out of the record.
    ctx.release(node, &uid).await?;

    let message = format!(
        "{}; deleted the machine's Pod, released its GPUs there, and placing it on another node",
        cause.describe(node)
    );
    let now = Time(Timestamp::now());
    let generation = machine.metadata.generation.unwrap_or_default();
    let mut status = status.clone();
    status.node_name = None;
    status.gpus.clear();
    status.pod_name = None;
    status.phase = Some(MachinePhase::Pending);
    status.message = Some(message.clone());
    set_node_lost(
        &mut status,
        "True",
        cause.reason(),
        &message,
        generation,
        &now,
    );
    set_condition(
        &mut status.conditions,
        ConditionType::Scheduled,
        "False",
        reasons::NODE_LOST,
        &message,
        generation,
        &now,
    );
    set_condition(
        &mut status.conditions,
        ConditionType::Ready,
        "False",
        reasons::NODE_LOST,
        &message,
        generation,
        &now,
    );
    crate::controller::write_status(machine, &status, ctx).await?;
    warn!(%node, reason = cause.reason(), "node lost; placing the machine again");
    ctx.publish(machine, Severity::Warning, reasons::NODE_LOST, &message);
    Ok(Action::requeue(Duration::from_millis(1)))
}

/// The machines that need the node-loss check now, from the caches: placed on a lost
/// node and not yet told, or on a healthy node with the condition still `True`. Pure
/// apart from reading the caches.
pub fn due(ctx: &Context, now: Timestamp) -> Vec<ObjectRef<GpuMachine>> {
    let mut verdicts: BTreeMap<String, NodeState> = BTreeMap::new();
    ctx.machines
        .state()
        .into_iter()
        .filter(|m| {
            let Some(node) = m
                .status
                .as_ref()
                .filter(|s| s.is_placed())
                .and_then(|s| s.node_name.clone())
            else {
                return false;
            };
            let (cause, labels) = verdicts
                .entry(node.clone())
                .or_insert_with(|| cached(ctx, &node, now));
            !matches!(
                decide(m, &node, cause.clone(), labels.as_ref()),
                Verdict::Healthy | Verdict::Waiting
            )
        })
        .map(|m| ObjectRef::from_obj(m.as_ref()))
        .collect()
}

/// A stream of machines to reconcile for node loss, one sweep of the caches per
/// [`Policy::sweep_period`] once they have synced.
pub fn triggers(ctx: Arc<Context>) -> impl Stream<Item = ObjectRef<GpuMachine>> + Send + 'static {
    let period = ctx.settings.node_loss.sweep_period();
    let sweeps = futures::stream::unfold(ctx, move |ctx| async move {
        tokio::time::sleep(period).await;
        let refs = if ctx.synced.all() {
            due(&ctx, Timestamp::now())
        } else {
            Vec::new()
        };
        Some((futures::stream::iter(refs), ctx))
    });
    futures::StreamExt::flatten(sweeps)
}

#[cfg(test)]
#[path = "node_loss_tests.rs"]
mod tests;
