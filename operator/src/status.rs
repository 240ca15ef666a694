//! What a placed machine's status should be, given its Pod: a pure function, so every
//! phase transition is a row in a table test.

use gpuvm_api::gpu_check::GpuCheck;
use gpuvm_api::{ConditionType, GpuMachine, GpuMachineStatus, MachinePhase, RestartPolicy, keys};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::pod::pod_name;

/// What to do with the machine's Pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodAction {
    /// Leave it.
    Nothing,
    /// Create the Pod (none exists for the current restart).
    Create,
    /// Delete the ended Pod; its replacement follows under the restart policy.
    DeleteForRestart,
    /// Delete the ended Pod for good, which frees the VM and so the GPUs.
    DeleteFinished,
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
}

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

/// Decides a placed machine's status and Pod action from its Pod (`None` when the Pod
/// for the current restart does not exist).
pub fn decide(machine: &GpuMachine, pod: Option<&Pod>, now: &Time) -> Decision {
    let current = machine.status.clone().unwrap_or_default();
    let mut status = current.clone();
    let generation = machine.metadata.generation.unwrap_or_default();
    status.observed_generation = Some(generation);
    let name = machine.name_any();
    let mut action = PodAction::Nothing;
    let mut notes = Vec::new();
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
    match pod {
        None if phase.is_terminal() => {
            // The ended Pod is gone: its VM, and so its GPUs, are released.
            status.pod_name = None;
        }
        None => {
            action = PodAction::Create;
            status.pod_name = Some(pod_name(&name, status.restarts));
            status.phase = Some(MachinePhase::Scheduled);
            status.message = Some(format!("{gpus} allocated on node {node}; creating the Pod"));
        }
        Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
            status.message = Some(format!("waiting for Pod {} to terminate", pod.name_any()));
        }
        Some(pod) => {
            status.pod_name = Some(pod.name_any());
            mirror_pod(machine, pod, &mut status, &mut action, generation, now);
        }
    }

    let new_phase = status.phase.unwrap_or_default();
    if new_phase != phase || status.restarts != current.restarts {
        let severity = if new_phase == MachinePhase::Failed {
            Severity::Warning
        } else {
            Severity::Normal
        };
        let reason = if status.restarts != current.restarts {
            "Restarting".to_owned()
        } else {
            new_phase.to_string()
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
    }
}

fn mirror_pod(
    machine: &GpuMachine,
    pod: &Pod,
    status: &mut GpuMachineStatus,
    action: &mut PodAction,
    generation: i64,
    now: &Time,
) {
    let pod_status = pod.status.clone().unwrap_or_default();
    let container = pod_status
        .container_statuses
        .as_ref()
        .and_then(|cs| cs.first().cloned());
    let state = container.as_ref().and_then(|c| c.state.clone());
    let phase = pod_status.phase.as_deref().unwrap_or("Pending");
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
            let ready = container.as_ref().is_some_and(|c| c.ready);
            let (s, r) = if ready {
                ("True", "Running")
            } else {
                ("False", "ContainerNotReady")
            };
            set_condition(
                conds,
                ConditionType::Ready,
                s,
                r,
                "the machine's container is running",
                generation,
                now,
            );
            gpu_check(pod, conds, generation, now);
        }
        "Succeeded" | "Failed" => {
            let terminated = state.and_then(|s| s.terminated);
            let code = terminated
                .as_ref()
                .map(|t| t.exit_code)
                .unwrap_or(i32::from(phase == "Failed"));
            status.exit_code = Some(code);
            let failed = phase == "Failed" || code != 0;
            let restart = match machine.spec.restart_policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => failed,
                RestartPolicy::Never => false,
            };
            let detail = terminated
                .and_then(|t| t.reason.or(t.message))
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            if restart {
                *action = PodAction::DeleteForRestart;
                status.restarts += 1;
                status.pod_name = Some(pod_name(&machine.name_any(), status.restarts));
                status.phase = Some(MachinePhase::Scheduled);
                status.message = Some(format!(
                    "container exited with code {code}{detail}; restarting on the same GPUs (restart {})",
                    status.restarts
                ));
            } else {
                *action = PodAction::DeleteFinished;
                status.phase = Some(if failed {
                    MachinePhase::Failed
                } else {
                    MachinePhase::Succeeded
                });
                status.message = Some(format!("container exited with code {code}{detail}"));
            }
            let reason = if failed { "Failed" } else { "Completed" };
            set_condition(
                conds,
                ConditionType::Ready,
                "False",
                reason,
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

fn gpu_check(pod: &Pod, conds: &mut Vec<Condition>, generation: i64, now: &Time) {
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
