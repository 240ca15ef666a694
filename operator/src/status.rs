//! What a placed machine's status should be, given its Pod: a pure function, so every
//! phase transition is a row in a table test.

use std::time::Duration;

use gpuvm_api::gpu_check::GpuCheck;
use gpuvm_api::workload::WorkloadError;
use gpuvm_api::{
    ConditionType, GpuCheckPolicy, GpuMachine, GpuMachineStatus, MachinePhase, RestartPolicy,
    Termination, keys,
};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::pod::{owned_by, pod_index, pod_name, reflects_spec, spec_change};

/// What to do with the machine's Pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodAction {
    /// Leave it.
    Nothing,
    /// Create the Pod (none exists for the current Pod index), once no Pod it replaces
    /// remains.
    Create,
    /// Delete the ended Pod; its replacement follows under the restart policy. The
    /// status (next Pod name, restart count) is written before the delete.
    DeleteForRestart,
    /// Delete a Pod that runs an older spec; its replacement follows once it is gone.
    /// The status (next Pod name) is written before the delete.
    Replace,
    /// Delete the ended Pod for good, which frees the VM and so the GPUs.
    DeleteFinished,
}

impl PodAction {
    /// Whether the action deletes the current Pod (after writing the status).
    pub fn deletes(self) -> bool {
        matches!(
            self,
            PodAction::DeleteForRestart | PodAction::Replace | PodAction::DeleteFinished
        )
    }
}

/// Restart back-off, as kubelet's CrashLoopBackOff: the n-th restart in a row waits
/// `base * 2^(n-1)`, at most `cap`; a run of at least `reset_after` starts a new row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The wait before the first restart of a row.
    pub base: Duration,
    /// The longest wait.
    pub cap: Duration,
    /// A run at least this long resets the row.
    pub reset_after: Duration,
}

impl Default for Backoff {
    /// kubelet's values: 10 s doubling to 5 min, reset after 10 min of running.
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(10),
            cap: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

impl Backoff {
    /// The wait before the `streak`-th restart in a row (none for 0).
    pub fn delay(&self, streak: i32) -> Duration {
        if streak <= 0 {
            return Duration::ZERO;
        }
        let doublings = u32::try_from(streak - 1).unwrap_or(0).min(20);
        self.base.saturating_mul(1 << doublings).min(self.cap)
    }
}

/// Whether an Event is routine or calls for attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// A normal state change.
    Normal,
    /// A failure or something the user should look at.
    Warning,
}

/// An Event to publish about the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Normal or Warning.
    pub severity: Severity,
    /// CamelCase reason.
    pub reason: String,
    /// A sentence for `kubectl describe`.
    pub message: String,
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The status to write (equal to the current one when nothing changed).
    pub status: GpuMachineStatus,
    /// What to do with the Pod.
    pub action: PodAction,
    /// Events to publish.
    pub notes: Vec<Note>,
    /// Look again after this long even if nothing happens (a back-off running out, a
    /// Pod this machine does not own).
    pub wait: Option<Duration>,
}

/// The termination message kept in status is cut to its last this many bytes (the
/// limit kubelet applies to the message itself).
pub const TERMINATION_MESSAGE_MAX: usize = 4096;

/// How long a Pod this machine does not own is left before looking again.
pub const NOT_OWNED_RETRY: Duration = Duration::from_secs(10);

/// Sets a condition, keeping `lastTransitionTime` when the status did not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    kind: ConditionType,
    status: &str,
    reason: &str,
    message: &str,
    generation: i64,
    now: &Time,
) {
    let new = Condition {
        type_: kind.as_str().to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: Some(generation),
        last_transition_time: now.clone(),
    };
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
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
        None => conditions.push(new),
    }
    conditions.sort_by_key(|c| {
        ConditionType::ALL
            .iter()
            .position(|k| k.as_str() == c.type_)
            .unwrap_or(usize::MAX)
    });
}

/// Status of a machine no node can take: `Pending` with `Scheduled=False`.
pub fn unschedulable(
    machine: &GpuMachine,
    reason: &str,
    message: &str,
    now: &Time,
) -> GpuMachineStatus {
    let mut status = machine.status.clone().unwrap_or_default();
    let generation = machine.metadata.generation.unwrap_or_default();
    status.phase = Some(MachinePhase::Pending);
    status.message = Some(message.to_owned());
    status.observed_generation = Some(generation);
    set_condition(
        &mut status.conditions,
        ConditionType::Scheduled,
        "False",
        reason,
        message,
        generation,
        now,
    );
    set_condition(
        &mut status.conditions,
        ConditionType::Ready,
        "False",
        "NotScheduled",
        "the machine has no GPUs yet",
        generation,
        now,
    );
    status
}

/// Decides a placed machine's status and Pod action from its current Pod (`None` when
/// no Pod of the current Pod index exists). `backoff` paces restarts.
///
/// `status.observedGeneration` advances only when the Pod runs the machine's current
/// spec (or when no Pod will run again), so a GitOps tool never reads an old image's
/// Pod as the new generation's.
pub fn decide(machine: &GpuMachine, pod: Option<&Pod>, backoff: &Backoff, now: &Time) -> Decision {
    let current = machine.status.clone().unwrap_or_default();
    let mut status = current.clone();
    let generation = machine.metadata.generation.unwrap_or_default();
    let name = machine.name_any();
    let mut action = PodAction::Nothing;
    let mut notes = Vec::new();
    let mut wait = None;
    let gpus = summary(&status);
    let node = status.node_name.clone().unwrap_or_default();

    set_condition(
        &mut status.conditions,
        ConditionType::Scheduled,
        "True",
        "Scheduled",
        &format!("{gpus} on node {node}"),
        generation,
        now,
    );

    let phase = current.phase.unwrap_or_default();
    let uid = machine.uid().unwrap_or_default();
    // A spec that asks its namespace for what a GpuMachine may not use gets no Pod.
    let refused = machine.spec.check_workload().err();
    match pod {
        None if phase.is_terminal() => {
            // The ended Pod is gone: its VM, and so its GPUs, are released. Nothing
            // runs again, so the status describes every generation.
            status.pod_name = None;
            status.next_restart_time = None;
            status.observed_generation = Some(generation);
        }
        None if refused.is_some() => {
            status.pod_name = None;
            status.phase = Some(MachinePhase::Scheduled);
            status.observed_generation = Some(generation);
        }
        None => {
            let next = pod_name(&name, pod_index(&status));
            status.pod_name = Some(next.clone());
            status.phase = Some(MachinePhase::Scheduled);
            match current
                .next_restart_time
                .as_ref()
                .map(|t| millis(t) - millis(now))
                .filter(|left| *left > 0)
            {
                Some(left) => {
                    wait = Some(Duration::from_millis(left.unsigned_abs()));
                    let at = current
                        .next_restart_time
                        .as_ref()
                        .map(|t| t.0.to_string())
                        .unwrap_or_default();
                    status.message = Some(format!(
                        "back-off: Pod {next} is created on the same GPUs at {at} (restart {})",
                        status.restarts
                    ));
                }
                None => {
                    action = PodAction::Create;
                    status.next_restart_time = None;
                    status.message =
                        Some(format!("{gpus} allocated on node {node}; creating the Pod"));
                }
            }
        }
        Some(pod) if !owned_by(pod, &uid) => {
            // Never adopt a Pod another owner (or nobody) controls: it may run another
            // machine's VM, and deleting it is not ours to do either.
            let message = format!(
                "Pod {} exists but is not controlled by this machine (uid {uid}); it is not adopted: delete it to let this machine run",
                pod.name_any()
            );
            not_ready(
                &current,
                &mut status,
                &mut notes,
                "PodNotOwned",
                message,
                generation,
                now,
            );
            wait = Some(NOT_OWNED_RETRY);
        }
        Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
            status.message = Some(format!("waiting for Pod {} to terminate", pod.name_any()));
        }
        Some(pod) => {
            status.pod_name = Some(pod.name_any());
            let reflects = reflects_spec(pod, &machine.spec);
            if reflects {
                status.observed_generation = Some(generation);
            }
            let pod_phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            let ended = matches!(pod_phase, Some("Succeeded" | "Failed"));
            if !reflects && !ended && refused.is_none() {
                roll_out(machine, pod, &mut status, generation, now);
                action = PodAction::Replace;
                notes.push(Note {
                    severity: Severity::Normal,
                    reason: "RollingOut".to_owned(),
                    message: status.message.clone().unwrap_or_default(),
                });
            } else {
                mirror_pod(
                    machine,
                    pod,
                    &mut status,
                    &mut action,
                    backoff,
                    reflects,
                    now,
                );
            }
        }
    }

    if let Some(error) = &refused
        && !phase.is_terminal()
    {
        refuse(&current, &mut status, error, &mut notes, generation, now);
    }

    let new_phase = status.phase.unwrap_or_default();
    if action != PodAction::Replace && (new_phase != phase || status.restarts != current.restarts) {
        let severity = if new_phase == MachinePhase::Failed || status.next_restart_time.is_some() {
            Severity::Warning
        } else {
            Severity::Normal
        };
        let reason = if status.restarts == current.restarts {
            new_phase.to_string()
        } else if status.next_restart_time.is_some() {
            "BackOff".to_owned()
        } else {
            "Restarting".to_owned()
        };
        notes.push(Note {
            severity,
            reason,
            message: status.message.clone().unwrap_or_default(),
        });
    }
    Decision {
        status,
        action,
        notes,
        wait,
    }
}

/// A spec the operator builds no Pod for ([`GpuMachineSpec::check_workload`]): no Pod
/// is created or replaced (a Pod of an earlier generation keeps running), and
/// `Ready=False` with reason `SpecRefused` says why until the spec changes.
///
/// [`GpuMachineSpec::check_workload`]: gpuvm_api::GpuMachineSpec::check_workload
fn refuse(
    current: &GpuMachineStatus,
    status: &mut GpuMachineStatus,
    error: &WorkloadError,
    notes: &mut Vec<Note>,
    generation: i64,
    now: &Time,
) {
    let running = status
        .pod_name
        .as_ref()
        .map(|pod| format!("; Pod {pod} of an earlier generation keeps running"))
        .unwrap_or_default();
    let message = format!("the operator refuses this spec: {error}{running}");
    not_ready(
        current,
        status,
        notes,
        "SpecRefused",
        message,
        generation,
        now,
    );
}

/// `Ready=False` with `reason` and `message` (also the status message), and a Warning
/// Event with the same reason when `Ready` did not already say it.
fn not_ready(
    current: &GpuMachineStatus,
    status: &mut GpuMachineStatus,
    notes: &mut Vec<Note>,
    reason: &str,
    message: String,
    generation: i64,
    now: &Time,
) {
    let was = current
        .condition(ConditionType::Ready)
        .map(|c| c.reason.as_str());
    if was != Some(reason) {
        notes.push(Note {
            severity: Severity::Warning,
            reason: reason.to_owned(),
            message: message.clone(),
        });
    }
    set_condition(
        &mut status.conditions,
        ConditionType::Ready,
        "False",
        reason,
        &message,
        generation,
        now,
    );
    status.message = Some(message);
}

/// A Pod that runs an older spec is replaced by one of the next Pod index, on the same
/// GPUs, once it is gone. No back-off: the user asked for the change.
fn roll_out(
    machine: &GpuMachine,
    pod: &Pod,
    status: &mut GpuMachineStatus,
    generation: i64,
    now: &Time,
) {
    let old = pod.name_any();
    status.pod_index = pod_index(status).saturating_add(1);
    let next = pod_name(&machine.name_any(), status.pod_index);
    status.pod_name = Some(next.clone());
    status.consecutive_restarts = 0;
    status.next_restart_time = None;
    status.phase = Some(MachinePhase::Scheduled);
    let message = format!(
        "rolling out generation {generation} ({}): Pod {old} is deleted, and {next} created on the same GPUs once it is gone",
        spec_change(pod, &machine.spec)
    );
    status.message = Some(message.clone());
    let observed = status.observed_generation.unwrap_or(generation);
    for kind in [ConditionType::VmReady, ConditionType::Ready] {
        set_condition(
            &mut status.conditions,
            kind,
            "False",
            "RollingOut",
            &message,
            observed,
            now,
        );
    }
}

/// Milliseconds since the epoch.
fn millis(t: &Time) -> i64 {
    t.0.as_millisecond()
}

/// `now + wait`, rounded up to the whole second (a `Time` travels with whole seconds,
/// and the replacement must never come before the time the status shows).
fn after(now: &Time, wait: Duration) -> Time {
    let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
    let due = millis(now).saturating_add(wait_ms);
    let secs = due.div_euclid(1000) + i64::from(due.rem_euclid(1000) != 0);
    Timestamp::from_second(secs).map_or_else(|_| now.clone(), Time)
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail(text: &str, max: usize) -> String {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

/// The evidence of an ended run, from the container's terminated state (or the Pod's
/// own reason when the container never reported one).
fn termination(pod: &Pod, terminated: Option<&ContainerStateTerminated>, code: i32) -> Termination {
    let pod_status = pod.status.as_ref();
    Termination {
        pod_name: pod.name_any(),
        exit_code: code,
        signal: terminated.and_then(|t| t.signal),
        reason: terminated
            .and_then(|t| t.reason.clone())
            .or_else(|| pod_status.and_then(|s| s.reason.clone())),
        message: terminated
            .and_then(|t| t.message.clone())
            .or_else(|| pod_status.and_then(|s| s.message.clone()))
            .filter(|m| !m.is_empty())
            .map(|m| tail(&m, TERMINATION_MESSAGE_MAX)),
        started_at: terminated.and_then(|t| t.started_at.clone()),
        finished_at: terminated.and_then(|t| t.finished_at.clone()),
    }
}

fn mirror_pod(
    machine: &GpuMachine,
    pod: &Pod,
    status: &mut GpuMachineStatus,
    action: &mut PodAction,
    backoff: &Backoff,
    reflects: bool,
    now: &Time,
) {
    let pod_status = pod.status.clone().unwrap_or_default();
    let container = pod_status
        .container_statuses
        .as_ref()
        .and_then(|cs| cs.first().cloned());
    let state = container.as_ref().and_then(|c| c.state.clone());
    let phase = pod_status.phase.as_deref().unwrap_or("Pending");
    // Conditions describe the generation the Pod runs.
    let generation = status
        .observed_generation
        .unwrap_or(machine.metadata.generation.unwrap_or_default());
    let gpu_required =
        machine.spec.gpu_check == GpuCheckPolicy::Required && !status.gpus.is_empty();
    let no_gpus = status.gpus.is_empty();
    let conds = &mut status.conditions;
    match phase {
        "Running" => {
            status.phase = Some(MachinePhase::Running);
            status.message = Some(format!(
                "running on node {}",
                status.node_name.clone().unwrap_or_default()
            ));
            set_condition(
                conds,
                ConditionType::VmReady,
                "True",
                "AgentReady",
                "the VM booted and its agent answers",
                generation,
                now,
            );
            let (gpu, gpu_message) = gpu_check(pod, conds, generation, now);
            let container_ready = container.as_ref().is_some_and(|c| c.ready);
            let (s, r, m) = if !container_ready {
                (
                    "False",
                    "ContainerNotReady",
                    "the machine's container is not ready".to_owned(),
                )
            } else if gpu == "True" {
                (
                    "True",
                    "Running",
                    "the container runs and the guest sees its GPUs".to_owned(),
                )
            } else if no_gpus {
                (
                    "True",
                    "Running",
                    "the container runs (the machine has no GPUs to check)".to_owned(),
                )
            } else if !gpu_required {
                (
                    "True",
                    "Running",
                    "the container runs; the GPU check is ignored (spec.gpuCheck: Ignored)"
                        .to_owned(),
                )
            } else if gpu == "Unknown" {
                (
                    "False",
                    "AwaitingGpuCheck",
                    "the container runs, but the guest's GPU check has not been reported yet"
                        .to_owned(),
                )
            } else {
                (
                    "False",
                    "GpuCheckFailed",
                    format!("the guest does not see its GPUs: {gpu_message}"),
                )
            };
            set_condition(conds, ConditionType::Ready, s, r, &m, generation, now);
        }
        "Succeeded" | "Failed" => {
            let terminated = state.and_then(|s| s.terminated);
            let code = terminated
                .as_ref()
                .map(|t| t.exit_code)
                .unwrap_or(i32::from(phase == "Failed"));
            status.exit_code = Some(code);
            status.last_termination = Some(termination(pod, terminated.as_ref(), code));
            let failed = phase == "Failed" || code != 0;
            let restart = match machine.spec.restart_policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => failed,
                RestartPolicy::Never => false,
            };
            let detail = terminated
                .as_ref()
                .and_then(|t| t.reason.clone().or(t.message.clone()))
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            let mut ready_reason = if failed { "Failed" } else { "Completed" };
            if restart {
                // A run as long as the reset period starts a new row of restarts; a
                // changed spec restarts at once (the user asked for it).
                let ran = terminated.as_ref().and_then(|t| {
                    Some(millis(t.finished_at.as_ref()?) - millis(t.started_at.as_ref()?))
                });
                let reset_ms = i64::try_from(backoff.reset_after.as_millis()).unwrap_or(i64::MAX);
                let streak = if !reflects {
                    0
                } else if ran.is_some_and(|ms| ms >= reset_ms) {
                    1
                } else {
                    status.consecutive_restarts.saturating_add(1)
                };
                let delay = backoff.delay(streak);
                *action = PodAction::DeleteForRestart;
                // The index first: an old status names its Pods by the restart count.
                status.pod_index = pod_index(status).saturating_add(1);
                status.restarts += 1;
                status.consecutive_restarts = streak;
                let next = pod_name(&machine.name_any(), status.pod_index);
                status.pod_name = Some(next.clone());
                status.phase = Some(MachinePhase::Scheduled);
                if delay.is_zero() {
                    status.next_restart_time = None;
                    status.message = Some(format!(
                        "container exited with code {code}{detail}; restarting on the same GPUs as Pod {next} once the old Pod is gone (restart {})",
                        status.restarts
                    ));
                } else {
                    let at = after(now, delay);
                    status.message = Some(format!(
                        "container exited with code {code}{detail}; back-off {}s: restarting on the same GPUs as Pod {next} at {} (restart {})",
                        delay.as_secs(),
                        at.0,
                        status.restarts
                    ));
                    status.next_restart_time = Some(at);
                    ready_reason = "CrashLoopBackOff";
                }
            } else {
                *action = PodAction::DeleteFinished;
                status.next_restart_time = None;
                status.phase = Some(if failed {
                    MachinePhase::Failed
                } else {
                    MachinePhase::Succeeded
                });
                status.message = Some(format!("container exited with code {code}{detail}"));
            }
            let conds = &mut status.conditions;
            set_condition(
                conds,
                ConditionType::Ready,
                "False",
                ready_reason,
                &format!("container exited with code {code}"),
                generation,
                now,
            );
            set_condition(
                conds,
                ConditionType::VmReady,
                "False",
                "Stopped",
                "the VM has stopped",
                generation,
                now,
            );
        }
        _ => {
            // Pending: the sandbox (VM) is being created or the image pulled.
            status.phase = Some(MachinePhase::Booting);
            let waiting = state.and_then(|s| s.waiting);
            let (reason, message) = match waiting {
                Some(w) => (
                    w.reason.clone().unwrap_or_else(|| "Booting".to_owned()),
                    w.message
                        .or(w.reason)
                        .unwrap_or_else(|| "the VM is booting".to_owned()),
                ),
                None => {
                    let unscheduled = pod_status
                        .conditions
                        .as_ref()
                        .and_then(|cs| {
                            cs.iter()
                                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                        })
                        .map(|c| c.message.clone().unwrap_or_default());
                    match unscheduled {
                        Some(m) => (
                            "PodUnschedulable".to_owned(),
                            format!("the Pod cannot be scheduled: {m}"),
                        ),
                        None => ("Booting".to_owned(), "the VM is booting".to_owned()),
                    }
                }
            };
            status.message = Some(message.clone());
            set_condition(
                conds,
                ConditionType::VmReady,
                "False",
                &reason,
                &message,
                generation,
                now,
            );
            set_condition(
                conds,
                ConditionType::Ready,
                "False",
                "Booting",
                "the VM is not running yet",
                generation,
                now,
            );
        }
    }
}

/// Mirrors the Pod's `gpuvm.dev/gpu-check` annotation into `GPUReady` and returns the
/// condition's status (`True`, `False` or `Unknown`) and message.
fn gpu_check(
    pod: &Pod,
    conds: &mut Vec<Condition>,
    generation: i64,
    now: &Time,
) -> (&'static str, String) {
    let annotation = pod.annotations().get(keys::ANNOTATION_GPU_CHECK);
    // One reader of the record's format: the type the node agent writes it with.
    let (status, reason, message) = match annotation.map(|v| (v, GpuCheck::parse(v))) {
        Some((_, Some(GpuCheck::Ok(summary)))) => ("True", "GuestSeesGpus", summary),
        Some((_, Some(GpuCheck::Failed(why)))) => ("False", "GuestGpuCheckFailed", why),
        Some((raw, None)) => (
            "False",
            "GuestGpuCheckUnreadable",
            format!("the gpu-check annotation is neither ok nor failed: {raw:?}"),
        ),
        None => (
            "Unknown",
            "AwaitingGuestCheck",
            "the shim has not reported the in-guest GPU check yet".to_owned(),
        ),
    };
    set_condition(
        conds,
        ConditionType::GpuReady,
        status,
        reason,
        &message,
        generation,
        now,
    );
    (status, message)
}

/// "2 x h100-80gb (0000:18:00.0, 0000:2a:00.0)".
fn summary(status: &GpuMachineStatus) -> String {
    let model = status
        .gpus
        .first()
        .map(|g| g.model.as_str())
        .unwrap_or("GPU");
    let addrs: Vec<&str> = status.gpus.iter().map(|g| g.pci_address.as_str()).collect();
    format!("{} x {model} ({})", status.gpus.len(), addrs.join(", "))
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
