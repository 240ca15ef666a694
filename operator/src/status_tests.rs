//! Table tests: one row per Pod state, asserting phase, action and conditions.

use super::*;
use gpuvm_api::{AllocatedGpu, GuestResources};
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use std::collections::BTreeMap;
use std::time::Duration;

fn now() -> Time {
    Time(Timestamp::from_second(1_700_000_000).unwrap())
}

fn machine(policy: RestartPolicy, phase: MachinePhase) -> GpuMachine {
    let gpu = AllocatedGpu {
        iommu_group: Some(1),
        numa_node: Some(0),
        ..crate::fixtures::l40s("0000:01:00.0", &[])
    };
    let mut m = crate::fixtures::placed("m", vec![gpu]);
    m.spec.image = "busybox".into();
    m.spec.guest = GuestResources {
        cpus: 2,
        memory: "4Gi".into(),
    };
    m.spec.restart_policy = policy;
    m.metadata.generation = Some(3);
    m.metadata.uid = Some("uid-m".into());
    if let Some(s) = m.status.as_mut() {
        s.phase = Some(phase);
        s.pod_name = Some("m-vm".into());
    }
    m
}

/// A Pod of machine `m` (uid `uid-m`) running its spec (image `busybox`).
fn pod(phase: &str, state: Option<ContainerState>, ready: bool) -> Pod {
    let mut p = Pod::default();
    p.metadata.name = Some("m-vm".into());
    p.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "gpuvm.dev/v1alpha1".into(),
        kind: "GpuMachine".into(),
        name: "m".into(),
        uid: "uid-m".into(),
        controller: Some(true),
        ..OwnerReference::default()
    }]);
    p.spec = Some(PodSpec {
        containers: vec![Container {
            name: "machine".into(),
            image: Some("busybox".into()),
            ..Container::default()
        }],
        ..PodSpec::default()
    });
    p.status = Some(PodStatus {
        phase: Some(phase.into()),
        container_statuses: state.map(|s| {
            vec![ContainerStatus {
                name: "machine".into(),
                ready,
                state: Some(s),
                ..ContainerStatus::default()
            }]
        }),
        ..PodStatus::default()
    });
    p
}

fn terminated(code: i32) -> Option<ContainerState> {
    Some(ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: code,
            reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    })
}

fn cond(d: &Decision, kind: ConditionType) -> (&str, &str) {
    let c = d.status.condition(kind).expect("condition present");
    (c.status.as_str(), c.reason.as_str())
}

#[test]
fn phases_follow_the_pod() {
    let running = Some(ContainerState {
        running: Some(ContainerStateRunning::default()),
        ..ContainerState::default()
    });
    let waiting = Some(ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some("ErrImagePull".into()),
            message: Some("pull access denied for busybox".into()),
        }),
        ..ContainerState::default()
    });
    use MachinePhase::*;
    use RestartPolicy::*;
    struct Row {
        name: &'static str,
        policy: RestartPolicy,
        pod: Option<Pod>,
        phase: MachinePhase,
        action: PodAction,
        ready: (&'static str, &'static str),
        restarts: i32,
    }
    let rows = vec![
        Row {
            name: "no pod yet",
            policy: Never,
            pod: None,
            phase: Scheduled,
            action: PodAction::Create,
            ready: ("False", "NotScheduled"),
            restarts: 0,
        },
        Row {
            name: "pod pending",
            policy: Never,
            pod: Some(pod("Pending", None, false)),
            phase: Booting,
            action: PodAction::Nothing,
            ready: ("False", "Booting"),
            restarts: 0,
        },
        Row {
            name: "image pull failing",
            policy: Never,
            pod: Some(pod("Pending", waiting, false)),
            phase: Booting,
            action: PodAction::Nothing,
            ready: ("False", "Booting"),
            restarts: 0,
        },
        Row {
            name: "running",
            policy: Never,
            pod: Some(pod("Running", running, true)),
            phase: Running,
            action: PodAction::Nothing,
            // The guest's GPU check is not in yet (gpu_check_decides_ready covers the rest).
            ready: ("False", "AwaitingGpuCheck"),
            restarts: 0,
        },
        Row {
            name: "succeeded, never",
            policy: Never,
            pod: Some(pod("Succeeded", terminated(0), false)),
            phase: Succeeded,
            action: PodAction::DeleteFinished,
            ready: ("False", "Completed"),
            restarts: 0,
        },
        Row {
            name: "failed, never",
            policy: Never,
            pod: Some(pod("Failed", terminated(2), false)),
            phase: Failed,
            action: PodAction::DeleteFinished,
            ready: ("False", "Failed"),
            restarts: 0,
        },
        Row {
            name: "failed, on failure",
            policy: OnFailure,
            pod: Some(pod("Failed", terminated(2), false)),
            phase: Scheduled,
            action: PodAction::DeleteForRestart,
            ready: ("False", "CrashLoopBackOff"),
            restarts: 1,
        },
        Row {
            name: "succeeded, on failure",
            policy: OnFailure,
            pod: Some(pod("Succeeded", terminated(0), false)),
            phase: Succeeded,
            action: PodAction::DeleteFinished,
            ready: ("False", "Completed"),
            restarts: 0,
        },
        Row {
            name: "succeeded, always",
            policy: Always,
            pod: Some(pod("Succeeded", terminated(0), false)),
            phase: Scheduled,
            action: PodAction::DeleteForRestart,
            ready: ("False", "CrashLoopBackOff"),
            restarts: 1,
        },
    ];
    for row in rows {
        let mut m = machine(row.policy, Booting);
        // "no pod yet" starts from a fresh placement, which has no Ready condition.
        let mut start = m.status.clone().unwrap();
        set_condition(
            &mut start.conditions,
            ConditionType::Ready,
            "False",
            "NotScheduled",
            "",
            3,
            &now(),
        );
        m.status = Some(start);
        let d = decide(&m, row.pod.as_ref(), &Backoff::default(), &now());
        assert_eq!(d.status.phase, Some(row.phase), "{}", row.name);
        assert_eq!(d.action, row.action, "{}", row.name);
        assert_eq!(cond(&d, ConditionType::Ready), row.ready, "{}", row.name);
        assert_eq!(d.status.restarts, row.restarts, "{}", row.name);
        assert_eq!(
            cond(&d, ConditionType::Scheduled),
            ("True", "Scheduled"),
            "{}",
            row.name
        );
        for c in &d.status.conditions {
            assert_eq!(c.observed_generation, Some(3), "{}: {}", row.name, c.type_);
        }
    }
}

#[test]
fn restart_names_the_next_pod_and_records_the_exit() {
    let m = machine(RestartPolicy::OnFailure, MachinePhase::Running);
    let d = decide(
        &m,
        Some(&pod("Failed", terminated(137), false)),
        &Backoff::default(),
        &now(),
    );
    assert_eq!(d.status.pod_name.as_deref(), Some("m-vm-1"));
    assert_eq!(d.status.pod_index, 1);
    assert_eq!(d.status.exit_code, Some(137));
    assert_eq!(d.notes.len(), 1);
    assert_eq!(d.notes[0].reason, "BackOff");
    assert_eq!(d.notes[0].severity, Severity::Warning);
    assert!(
        d.notes[0].message.contains("exited with code 137"),
        "{:?}",
        d.notes
    );
}

#[test]
fn image_pull_errors_reach_the_message() {
    let waiting = Some(ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some("ErrImagePull".into()),
            message: Some("pull access denied".into()),
        }),
        ..ContainerState::default()
    });
    let d = decide(
        &machine(RestartPolicy::Never, MachinePhase::Scheduled),
        Some(&pod("Pending", waiting, false)),
        &Backoff::default(),
        &now(),
    );
    assert_eq!(cond(&d, ConditionType::VmReady), ("False", "ErrImagePull"));
    assert_eq!(d.status.message.as_deref(), Some("pull access denied"));
    assert_eq!(d.notes[0].reason, "Booting");
}

#[test]
fn gpu_check_annotation_drives_gpu_ready() {
    let running = || {
        Some(ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..ContainerState::default()
        })
    };
    let m = machine(RestartPolicy::Never, MachinePhase::Booting);
    let cases = [
        (None, ("Unknown", "AwaitingGuestCheck")),
        (Some("ok: 1 x l40s"), ("True", "GuestSeesGpus")),
        (
            Some("failed: guest sees 0 GPUs, expected 1"),
            ("False", "GuestGpuCheckFailed"),
        ),
        (Some("okay-ish"), ("False", "GuestGpuCheckUnreadable")),
    ];
    for (annotation, want) in cases {
        let mut p = pod("Running", running(), true);
        if let Some(a) = annotation {
            p.metadata.annotations = Some(BTreeMap::from([(
                keys::ANNOTATION_GPU_CHECK.to_owned(),
                a.to_owned(),
            )]));
        }
        let d = decide(&m, Some(&p), &Backoff::default(), &now());
        assert_eq!(cond(&d, ConditionType::GpuReady), want, "{annotation:?}");
    }
}

#[test]
fn an_ended_pod_that_is_gone_releases_the_gpus() {
    let mut m = machine(RestartPolicy::Never, MachinePhase::Succeeded);
    m.status.as_mut().unwrap().observed_generation = Some(2);
    let d = decide(&m, None, &Backoff::default(), &now());
    // Nothing runs again: the status describes the current generation too.
    assert_eq!(d.status.observed_generation, Some(3));
    assert_eq!(d.action, PodAction::Nothing);
    assert_eq!(d.status.pod_name, None);
    assert_eq!(d.status.phase, Some(MachinePhase::Succeeded));
    assert!(d.notes.is_empty());
}

#[test]
fn transition_time_is_kept_while_status_holds() {
    let mut conds = Vec::new();
    let t0 = now();
    let t1 = Time(Timestamp::from_second(1_700_000_100).unwrap());
    set_condition(
        &mut conds,
        ConditionType::Ready,
        "False",
        "Booting",
        "",
        1,
        &t0,
    );
    set_condition(
        &mut conds,
        ConditionType::Ready,
        "False",
        "Booting",
        "still",
        2,
        &t1,
    );
    assert_eq!(conds[0].last_transition_time, t0);
    assert_eq!(conds[0].observed_generation, Some(2));
    set_condition(
        &mut conds,
        ConditionType::Ready,
        "True",
        "Running",
        "",
        2,
        &t1,
    );
    assert_eq!(conds[0].last_transition_time, t1);
    set_condition(
        &mut conds,
        ConditionType::Scheduled,
        "True",
        "Scheduled",
        "",
        2,
        &t1,
    );
    assert_eq!(
        conds[0].type_, "Scheduled",
        "conditions are kept in a stable order"
    );
}

fn at(second: i64) -> Time {
    Time(Timestamp::from_second(second).unwrap())
}

fn ended(code: i32, started: i64, finished: i64, message: Option<&str>) -> Pod {
    pod(
        if code == 0 { "Succeeded" } else { "Failed" },
        Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
                message: message.map(str::to_owned),
                started_at: Some(at(started)),
                finished_at: Some(at(finished)),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        }),
        false,
    )
}

#[test]
fn backoff_doubles_from_ten_seconds_and_stops_at_five_minutes() {
    let b = Backoff::default();
    let waits: Vec<u64> = (0..9).map(|n| b.delay(n).as_secs()).collect();
    assert_eq!(waits, [0, 10, 20, 40, 80, 160, 300, 300, 300]);
    assert_eq!(b.delay(i32::MAX), Duration::from_secs(300));
    let fast = Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_millis(250),
        reset_after: Duration::from_secs(1),
    };
    assert_eq!(fast.delay(3), Duration::from_millis(250));
}

#[test]
fn restarts_in_a_row_back_off_and_a_long_run_resets_the_row() {
    let t = 1_700_000_000;
    let mut m = machine(RestartPolicy::OnFailure, MachinePhase::Running);
    m.status.as_mut().unwrap().restarts = 2;
    m.status.as_mut().unwrap().consecutive_restarts = 2;
    // A 5 s run: the third restart in a row waits 40 s.
    let d = decide(
        &m,
        Some(&ended(1, t - 5, t, None)),
        &Backoff::default(),
        &now(),
    );
    assert_eq!(d.action, PodAction::DeleteForRestart);
    assert_eq!(
        (
            d.status.restarts,
            d.status.consecutive_restarts,
            d.status.pod_index
        ),
        (3, 3, 3)
    );
    assert_eq!(d.status.pod_name.as_deref(), Some("m-vm-3"));
    assert_eq!(d.status.next_restart_time, Some(at(t + 40)));
    assert_eq!(
        cond(&d, ConditionType::Ready),
        ("False", "CrashLoopBackOff")
    );
    assert!(
        d.status
            .message
            .as_deref()
            .unwrap()
            .contains("back-off 40s"),
        "{:?}",
        d.status.message
    );
    assert_eq!(d.notes[0].reason, "BackOff");

    // An 11-minute run: the row starts again at 10 s.
    let d = decide(
        &m,
        Some(&ended(1, t - 660, t, None)),
        &Backoff::default(),
        &now(),
    );
    assert_eq!(d.status.consecutive_restarts, 1);
    assert_eq!(d.status.next_restart_time, Some(at(t + 10)));
}

#[test]
fn the_replacement_waits_for_the_back_off_then_is_created() {
    let t = 1_700_000_000;
    let mut m = machine(RestartPolicy::OnFailure, MachinePhase::Scheduled);
    let s = m.status.as_mut().unwrap();
    s.restarts = 1;
    s.pod_index = 1;
    s.pod_name = Some("m-vm-1".into());
    s.next_restart_time = Some(at(t + 7));
    let d = decide(&m, None, &Backoff::default(), &now());
    assert_eq!(d.action, PodAction::Nothing);
    assert_eq!(d.wait, Some(Duration::from_secs(7)));
    assert!(d.status.message.as_deref().unwrap().contains("back-off"));
    // Due: created, and the time is cleared.
    let d = decide(&m, None, &Backoff::default(), &at(t + 7));
    assert_eq!(d.action, PodAction::Create);
    assert_eq!(d.status.pod_name.as_deref(), Some("m-vm-1"));
    assert_eq!(d.status.next_restart_time, None);
    assert_eq!(d.wait, None);
}

#[test]
fn a_spec_change_rolls_out_a_new_pod_and_observed_generation_waits_for_it() {
    let running = Some(ContainerState {
        running: Some(ContainerStateRunning::default()),
        ..ContainerState::default()
    });
    let mut m = machine(RestartPolicy::Never, MachinePhase::Running);
    m.status.as_mut().unwrap().observed_generation = Some(2);
    m.spec.image = "busybox:2".into();
    let d = decide(
        &m,
        Some(&pod("Running", running.clone(), true)),
        &Backoff::default(),
        &now(),
    );
    assert_eq!(d.action, PodAction::Replace);
    assert_eq!(d.status.pod_name.as_deref(), Some("m-vm-1"));
    assert_eq!(d.status.pod_index, 1);
    assert_eq!(d.status.restarts, 0, "a roll-out is not a restart");
    assert_eq!(
        d.status.observed_generation,
        Some(2),
        "the Pod runs generation 2"
    );
    assert_eq!(cond(&d, ConditionType::Ready), ("False", "RollingOut"));
    assert_eq!(d.notes.len(), 1);
    assert_eq!(d.notes[0].reason, "RollingOut");
    assert!(
        d.notes[0].message.contains("image busybox -> busybox:2"),
        "{:?}",
        d.notes
    );

    // The new Pod runs the spec: now the generation is observed.
    let mut next = pod("Running", running, true);
    next.spec.as_mut().unwrap().containers[0].image = Some("busybox:2".into());
    let mut m2 = m.clone();
    m2.status = Some(d.status.clone());
    let d = decide(&m2, Some(&next), &Backoff::default(), &now());
    assert_eq!(d.action, PodAction::Nothing);
    assert_eq!(d.status.observed_generation, Some(3));
}

#[test]
fn an_ended_pod_of_an_older_spec_restarts_at_once() {
    let t = 1_700_000_000;
    let mut m = machine(RestartPolicy::Always, MachinePhase::Running);
    m.status.as_mut().unwrap().consecutive_restarts = 4;
    m.spec.args = vec!["--fixed".into()];
    let d = decide(
        &m,
        Some(&ended(1, t - 5, t, None)),
        &Backoff::default(),
        &now(),
    );
    assert_eq!(d.action, PodAction::DeleteForRestart);
    assert_eq!(d.status.next_restart_time, None);
    assert_eq!(d.status.consecutive_restarts, 0);
    assert_eq!(d.notes[0].reason, "Restarting");
}

#[test]
fn a_pod_the_machine_does_not_own_is_not_adopted() {
    let running = Some(ContainerState {
        running: Some(ContainerStateRunning::default()),
        ..ContainerState::default()
    });
    let m = machine(RestartPolicy::Never, MachinePhase::Scheduled);
    for owners in [None, Some("uid-other")] {
        let mut foreign = pod("Running", running.clone(), true);
        foreign.metadata.owner_references = owners.map(|uid| {
            vec![OwnerReference {
                uid: uid.into(),
                controller: Some(true),
                ..OwnerReference::default()
            }]
        });
        let d = decide(&m, Some(&foreign), &Backoff::default(), &now());
        assert_eq!(d.action, PodAction::Nothing, "{owners:?}");
        assert_eq!(cond(&d, ConditionType::Ready), ("False", "PodNotOwned"));
        assert_eq!(d.status.phase, Some(MachinePhase::Scheduled));
        assert_eq!(d.wait, Some(NOT_OWNED_RETRY));
        assert_eq!(d.notes.len(), 1);
        assert_eq!(d.notes[0].reason, "PodNotOwned");
        assert_eq!(d.notes[0].severity, Severity::Warning);
        // Said once: the next look finds the condition already there.
        let mut again = m.clone();
        again.status = Some(d.status.clone());
        let d = decide(&again, Some(&foreign), &Backoff::default(), &now());
        assert!(d.notes.is_empty(), "{:?}", d.notes);
    }
}

#[test]
fn gpu_check_decides_ready_unless_ignored() {
    let running = || {
        Some(ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..ContainerState::default()
        })
    };
    let cases = [
        (
            GpuCheckPolicy::Required,
            None,
            ("False", "AwaitingGpuCheck"),
        ),
        (
            GpuCheckPolicy::Required,
            Some("ok: 1 x l40s"),
            ("True", "Running"),
        ),
        (
            GpuCheckPolicy::Required,
            Some("failed: guest sees 0 GPUs"),
            ("False", "GpuCheckFailed"),
        ),
        (GpuCheckPolicy::Ignored, None, ("True", "Running")),
        (
            GpuCheckPolicy::Ignored,
            Some("failed: guest sees 0 GPUs"),
            ("True", "Running"),
        ),
    ];
    for (policy, annotation, want) in cases {
        let mut m = machine(RestartPolicy::Never, MachinePhase::Booting);
        m.spec.gpu_check = policy;
        let mut p = pod("Running", running(), true);
        if let Some(a) = annotation {
            p.metadata.annotations = Some(BTreeMap::from([(
                keys::ANNOTATION_GPU_CHECK.to_owned(),
                a.to_owned(),
            )]));
        }
        let d = decide(&m, Some(&p), &Backoff::default(), &now());
        assert_eq!(
            cond(&d, ConditionType::Ready),
            want,
            "{policy:?} {annotation:?}"
        );
        assert_eq!(d.status.phase, Some(MachinePhase::Running));
    }
    // A container that is not ready is not Ready, whatever the guest sees.
    let m = machine(RestartPolicy::Never, MachinePhase::Booting);
    let mut p = pod("Running", running(), false);
    p.metadata.annotations = Some(BTreeMap::from([(
        keys::ANNOTATION_GPU_CHECK.to_owned(),
        "ok: 1 x l40s".to_owned(),
    )]));
    let d = decide(&m, Some(&p), &Backoff::default(), &now());
    assert_eq!(
        cond(&d, ConditionType::Ready),
        ("False", "ContainerNotReady")
    );
}

#[test]
fn a_finished_machine_keeps_exit_code_reason_and_log_tail() {
    let t = 1_700_000_000;
    let m = machine(RestartPolicy::Never, MachinePhase::Running);
    let log = "epoch 1\nepoch 2\nCUDA error: out of memory\n";
    let d = decide(
        &m,
        Some(&ended(2, t - 30, t, Some(log))),
        &Backoff::default(),
        &now(),
    );
    assert_eq!(d.action, PodAction::DeleteFinished);
    assert_eq!(d.status.phase, Some(MachinePhase::Failed));
    let last = d.status.last_termination.clone().unwrap();
    assert_eq!(last.pod_name, "m-vm");
    assert_eq!(last.exit_code, 2);
    assert_eq!(last.reason.as_deref(), Some("Error"));
    assert_eq!(last.message.as_deref(), Some(log));
    assert_eq!(last.started_at, Some(at(t - 30)));
    assert_eq!(last.finished_at, Some(at(t)));

    // A long message keeps its end (the last lines), cut to the limit.
    let long = format!("{}é{}THE END", "x".repeat(5000), "y".repeat(4000));
    let d = decide(
        &m,
        Some(&ended(1, t - 1, t, Some(&long))),
        &Backoff::default(),
        &now(),
    );
    let kept = d.status.last_termination.unwrap().message.unwrap();
    assert!(kept.len() <= TERMINATION_MESSAGE_MAX, "{}", kept.len());
    assert!(kept.ends_with("THE END"));

    // A Pod that failed without a container state (evicted) still says why.
    let mut evicted = pod("Failed", None, false);
    let ps = evicted.status.as_mut().unwrap();
    ps.reason = Some("Evicted".into());
    ps.message = Some("the node was low on memory".into());
    let d = decide(&m, Some(&evicted), &Backoff::default(), &now());
    let last = d.status.last_termination.unwrap();
    assert_eq!(last.exit_code, 1);
    assert_eq!(last.reason.as_deref(), Some("Evicted"));
    assert_eq!(last.message.as_deref(), Some("the node was low on memory"));
}

#[test]
fn a_terminating_pod_is_waited_for() {
    let mut p = pod("Running", None, false);
    p.metadata.deletion_timestamp = Some(now());
    let m = machine(RestartPolicy::Never, MachinePhase::Running);
    let d = decide(&m, Some(&p), &Backoff::default(), &now());
    assert_eq!(d.action, PodAction::Nothing);
    assert!(d.status.message.as_deref().unwrap().contains("terminate"));
}
