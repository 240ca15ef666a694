use super::*;
use gpuvm_api::{GpuNodeSpec, GpuNodeStatus};
use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(s).unwrap()
}

fn policy() -> Policy {
    Policy {
        grace: Duration::from_secs(60),
        heartbeat_timeout: Duration::from_secs(30),
    }
}

fn node(ready: Option<(&str, i64)>) -> Node {
    let mut n = Node::default();
    n.metadata.name = Some("n1".into());
    n.metadata.creation_timestamp = Some(Time(t(0)));
    n.status = Some(NodeStatus {
        conditions: ready.map(|(status, since)| {
            vec![NodeCondition {
                type_: "Ready".into(),
                status: status.into(),
                last_transition_time: Some(Time(t(since))),
                ..NodeCondition::default()
            }]
        }),
        ..NodeStatus::default()
    });
    n
}

fn gpu_node(heartbeat: Option<i64>, created: i64) -> GpuNode {
    let mut g = GpuNode::new(
        "n1",
        GpuNodeSpec {
            node_name: "n1".into(),
            unschedulable: false,
        },
    );
    g.metadata.creation_timestamp = Some(Time(t(created)));
    g.status = Some(GpuNodeStatus {
        heartbeat: heartbeat.map(|h| Time(t(h))),
        ..GpuNodeStatus::default()
    });
    g
}

#[test]
fn a_node_is_lost_when_deleted_not_ready_past_grace_or_silent_past_timeout_and_grace() {
    let now = t(10_000);
    let p = policy();
    let healthy = node(Some(("True", 0)));
    let beating = gpu_node(Some(9_990), 0);
    type Case<'a> = (&'a str, Option<Node>, Option<GpuNode>, Option<&'a str>);
    let cases: Vec<Case<'_>> = vec![
        (
            "healthy",
            Some(healthy.clone()),
            Some(beating.clone()),
            None,
        ),
        (
            "deleted",
            None,
            Some(beating.clone()),
            Some(reasons::NODE_DELETED),
        ),
        (
            "not ready within grace",
            Some(node(Some(("False", 9_950)))),
            Some(beating.clone()),
            None,
        ),
        (
            "not ready past grace",
            Some(node(Some(("False", 9_900)))),
            Some(beating.clone()),
            Some(reasons::NODE_NOT_READY),
        ),
        (
            "unknown past grace",
            Some(node(Some(("Unknown", 9_000)))),
            Some(beating.clone()),
            Some(reasons::NODE_NOT_READY),
        ),
        (
            "never reported readiness",
            Some(node(None)),
            Some(beating.clone()),
            None,
        ),
        (
            "heartbeat stale but within timeout + grace",
            Some(healthy.clone()),
            Some(gpu_node(Some(9_920), 0)),
            None,
        ),
        (
            "heartbeat stale past timeout + grace",
            Some(healthy.clone()),
            Some(gpu_node(Some(9_900), 0)),
            Some(reasons::HEARTBEAT_LOST),
        ),
        (
            "no GpuNode",
            Some(healthy.clone()),
            None,
            Some(reasons::HEARTBEAT_LOST),
        ),
        (
            "new GpuNode without a beat yet",
            Some(healthy.clone()),
            Some(gpu_node(None, 9_990)),
            None,
        ),
        (
            "old GpuNode that never beat",
            Some(healthy),
            Some(gpu_node(None, 0)),
            Some(reasons::HEARTBEAT_LOST),
        ),
    ];
    for (name, n, g, want) in cases {
        let got = judge(n.as_ref(), g.as_ref(), now, &p);
        assert_eq!(got.as_ref().map(Cause::reason), want, "{name}: {got:?}");
    }
    assert_eq!(
        judge(Some(&node(Some(("False", 9_900)))), Some(&beating), now, &p),
        Some(Cause::NotReady(Duration::from_secs(100)))
    );
    assert!(
        Cause::HeartbeatLost(Some(Duration::from_secs(95)))
            .describe("n1")
            .contains("95s")
    );
}

fn machine(selector: &[(&str, &str)], lost: Option<(&str, &str)>) -> GpuMachine {
    let mut m = crate::fixtures::placed("m", vec![crate::fixtures::l40s("0000:01:00.0", &[])]);
    m.spec.node_selector = selector
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    if let (Some((state, reason)), Some(status)) = (lost, m.status.as_mut()) {
        set_node_lost(status, state, reason, "m", 1, &Time(t(0)));
    }
    m
}

#[test]
fn only_a_hostname_selector_for_that_node_pins_a_machine() {
    let labels = BTreeMap::from([(HOSTNAME_LABEL.to_owned(), "host-1".to_owned())]);
    assert!(pinned_to(
        &machine(&[(HOSTNAME_LABEL, "n1")], None),
        "n1",
        None
    ));
    assert!(pinned_to(
        &machine(&[(HOSTNAME_LABEL, "host-1")], None),
        "n1",
        Some(&labels)
    ));
    assert!(!pinned_to(
        &machine(&[(HOSTNAME_LABEL, "n2")], None),
        "n1",
        Some(&labels)
    ));
    assert!(!pinned_to(&machine(&[("zone", "n1")], None), "n1", None));
    assert!(!pinned_to(&machine(&[], None), "n1", None));
}

#[test]
fn lost_machines_move_unless_pinned_and_the_condition_clears_on_a_healthy_node() {
    let pin = [(HOSTNAME_LABEL, "n1")];
    let deleted = Some(Cause::NodeDeleted);
    let cases: Vec<(&str, GpuMachine, Option<Cause>, Verdict)> = vec![
        ("healthy", machine(&[], None), None, Verdict::Healthy),
        (
            "healthy, condition already False",
            machine(&[], Some(("False", reasons::REPLACED))),
            None,
            Verdict::Healthy,
        ),
        (
            "lost",
            machine(&[("zone", "a")], None),
            deleted.clone(),
            Verdict::Move(Cause::NodeDeleted),
        ),
        (
            "lost again after a move that did not finish",
            machine(&[], Some(("True", reasons::NODE_DELETED))),
            deleted.clone(),
            Verdict::Move(Cause::NodeDeleted),
        ),
        (
            "pinned, not yet told",
            machine(&pin, None),
            deleted.clone(),
            Verdict::Wait(Cause::NodeDeleted),
        ),
        (
            "pinned, told",
            machine(&pin, Some(("True", reasons::NODE_DELETED))),
            deleted.clone(),
            Verdict::Waiting,
        ),
        (
            "pinned, the cause changed",
            machine(&pin, Some(("True", reasons::NODE_NOT_READY))),
            deleted,
            Verdict::Wait(Cause::NodeDeleted),
        ),
        (
            "moved and placed again",
            machine(&[], Some(("True", reasons::HEARTBEAT_LOST))),
            None,
            Verdict::Clear {
                reason: reasons::REPLACED,
            },
        ),
        (
            "pinned node back",
            machine(&pin, Some(("True", reasons::NODE_DELETED))),
            None,
            Verdict::Clear {
                reason: reasons::RECOVERED,
            },
        ),
    ];
    for (name, m, cause, want) in cases {
        assert_eq!(decide(&m, "n1", cause, None), want, "{name}");
    }
}

#[test]
fn an_ended_machine_is_never_moved() {
    for phase in [
        gpuvm_api::MachinePhase::Succeeded,
        gpuvm_api::MachinePhase::Failed,
    ] {
        let mut m = machine(&[], None);
        if let Some(s) = m.status.as_mut() {
            s.phase = Some(phase);
        }
        assert_eq!(
            decide(&m, "n1", Some(Cause::NodeDeleted), None),
            Verdict::Healthy,
            "{phase:?}"
        );
    }
    let mut running = machine(&[], None);
    if let Some(s) = running.status.as_mut() {
        s.phase = Some(gpuvm_api::MachinePhase::Running);
    }
    assert_eq!(
        decide(&running, "n1", Some(Cause::NodeDeleted), None),
        Verdict::Move(Cause::NodeDeleted)
    );
}

#[test]
fn the_sweep_runs_a_few_times_per_grace_within_bounds() {
    let p = |grace, hb| Policy {
        grace: Duration::from_secs(grace),
        heartbeat_timeout: Duration::from_secs(hb),
    };
    assert_eq!(p(300, 120).sweep_period(), Duration::from_secs(10));
    assert_eq!(p(3, 3).sweep_period(), Duration::from_secs(1));
    assert_eq!(p(15, 60).sweep_period(), Duration::from_secs(5));
}
