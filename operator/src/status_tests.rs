//! Table tests: one row per Pod state, asserting phase, action and conditions.

use super::*;
use gpuvm_api::{AllocatedGpu, GpuMachineSpec, GpuRequest, GuestResources};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodStatus,
};
use k8s_openapi::jiff::Timestamp;
use std::collections::BTreeMap;

fn now() -> Time {
    Time(Timestamp::from_second(1_700_000_000).unwrap())
}

fn machine(policy: RestartPolicy, phase: MachinePhase) -> GpuMachine {
    let mut m = GpuMachine::new(
        "m",
        GpuMachineSpec {
            image: "busybox".into(),
            command: vec![],
            args: vec![],
            env: vec![],
            gpu: GpuRequest {
                model: "l40s".into(),
                count: 1,
            },
            guest: GuestResources {
                cpus: 2,
                memory: "4Gi".into(),
            },
            restart_policy: policy,
            node_selector: BTreeMap::new(),
            placement: Default::default(),
        },
    );
    m.metadata.generation = Some(3);
    m.status = Some(GpuMachineStatus {
        phase: Some(phase),
        node_name: Some("n1".into()),
        pod_name: Some("m-vm".into()),
        gpus: vec![AllocatedGpu {
            pci_address: "0000:01:00.0".into(),
            model: "l40s".into(),
            iommu_group: Some(1),
            numa_node: Some(0),
            companions: vec![],
        }],
        ..Default::default()
    });
    m
}

fn pod(phase: &str, state: Option<ContainerState>, ready: bool) -> Pod {
    let mut p = Pod::default();
    p.metadata.name = Some("m-vm".into());
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
            ready: ("True", "Running"),
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
            ready: ("False", "Failed"),
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
            ready: ("False", "Completed"),
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
        let d = decide(&m, row.pod.as_ref(), &now());
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
    let d = decide(&m, Some(&pod("Failed", terminated(137), false)), &now());
    assert_eq!(d.status.pod_name.as_deref(), Some("m-vm-1"));
    assert_eq!(d.status.exit_code, Some(137));
    assert_eq!(d.notes.len(), 1);
    assert_eq!(d.notes[0].reason, "Restarting");
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
        let d = decide(&m, Some(&p), &now());
        assert_eq!(cond(&d, ConditionType::GpuReady), want, "{annotation:?}");
    }
}

#[test]
fn an_ended_pod_that_is_gone_releases_the_gpus() {
    let m = machine(RestartPolicy::Never, MachinePhase::Succeeded);
    let d = decide(&m, None, &now());
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
