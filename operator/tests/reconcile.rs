//! Reconcile tests against a scripted API server (the controller-rs pattern): kube's
//! real `Client` talks HTTP to a `tower_test` mock, and each scenario answers the exact
//! requests the reconciler must make, in order, asserting their contents.

// Helpers of an integration test are test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gpuvm_api::{
    AllocatedGpu, GpuAllocation, GpuDevice, GpuMachine, GpuMachineSpec, GpuMachineStatus, GpuNode,
    GpuNodeSpec, GpuNodeStatus, GpuRequest, GuestResources, IommuMember, MachinePhase, MachineRef,
    MemberRole, RestartPolicy, keys,
};
use gpuvm_operator::controller::{Cache, Context, Error, Settings, Synced, reconcile};
use gpuvm_operator::metrics::Metrics;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus, Node,
    NodeCondition, NodeStatus, Pod, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// The scripted API server.
struct Server(tokio::sync::mpsc::UnboundedReceiver<Call>);

/// One request the reconciler made.
struct Call {
    method: Method,
    path: String,
    query: String,
    body: Value,
    reply: tower_test::mock::SendResponse<Response<Body>>,
}

impl Call {
    fn respond(self, status: StatusCode, body: &Value) {
        self.reply.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(body).unwrap()))
                .unwrap(),
        );
    }
    fn ok(self, body: &impl serde::Serialize) {
        let v = serde_json::to_value(body).unwrap();
        self.respond(StatusCode::OK, &v);
    }
    fn error(self, code: u16, reason: &str) {
        let status = StatusCode::from_u16(code).unwrap();
        self.respond(
            status,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": format!("scripted {reason}"), "reason": reason, "code": code}),
        );
    }
}

impl Server {
    /// Serves the mock in the background: Events are answered at once (they are best
    /// effort and may come at any point); every other request is queued for the test.
    fn spawn(mut handle: Handle) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some((req, reply)) = handle.next_request().await {
                let method = req.method().clone();
                let path = req.uri().path().to_owned();
                let query = req.uri().query().unwrap_or_default().to_owned();
                let bytes = req.into_body().collect_bytes().await.unwrap();
                if path.contains("/events") {
                    reply.send_response(
                        Response::builder()
                            .status(201)
                            .body(Body::from(bytes.to_vec()))
                            .unwrap(),
                    );
                    continue;
                }
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let call = Call {
                    method,
                    path,
                    query,
                    body,
                    reply,
                };
                if tx.send(call).is_err() {
                    break;
                }
            }
        });
        Server(rx)
    }

    /// The next request that is not an Event.
    async fn next(&mut self) -> Call {
        tokio::time::timeout(Duration::from_secs(5), self.0.recv())
            .await
            .expect("the reconciler made no further request within 5 s")
            .expect("the client hung up")
    }

    /// The next request, asserted to be `method` on `path`.
    async fn expect(&mut self, method: Method, path: &str) -> Call {
        let call = self.next().await;
        assert_eq!((call.method.clone(), call.path.as_str()), (method, path));
        call
    }

    /// Asserts that no request other than Events is pending.
    async fn done(&mut self) {
        if let Ok(Some(call)) =
            tokio::time::timeout(Duration::from_millis(300), self.0.recv()).await
        {
            panic!("unexpected request {} {}", call.method, call.path);
        }
    }
}

const MACHINES: &str = "/apis/gpuvm.dev/v1alpha1/namespaces/default/gpumachines";
const RECORDS: &str = "/apis/gpuvm.dev/v1alpha1/gpuallocations";

fn machine(name: &str) -> GpuMachine {
    let mut m = GpuMachine::new(
        name,
        GpuMachineSpec {
            image: "busybox:1.36".into(),
            command: vec!["sh".into(), "-c".into(), "nvidia-smi".into()],
            args: vec![],
            env: vec![],
            gpu: GpuRequest {
                model: "l40s".into(),
                count: 1,
            },
            guest: GuestResources {
                cpus: 4,
                memory: "8Gi".into(),
            },
            restart_policy: RestartPolicy::Never,
            node_selector: BTreeMap::new(),
            placement: Default::default(),
            gpu_check: Default::default(),
            ..Default::default()
        },
    );
    m.metadata.namespace = Some("default".into());
    m.metadata.uid = Some(format!("uid-{name}"));
    m.metadata.resource_version = Some("1".into());
    m.metadata.generation = Some(1);
    m.metadata.finalizers = Some(vec![keys::FINALIZER.into()]);
    m
}

fn placed(name: &str) -> GpuMachine {
    let mut m = machine(name);
    m.status = Some(GpuMachineStatus {
        phase: Some(MachinePhase::Scheduled),
        node_name: Some("ws".into()),
        gpus: vec![AllocatedGpu {
            pci_address: "0000:01:00.0".into(),
            model: "l40s".into(),
            iommu_group: Some(12),
            numa_node: Some(0),
            companions: vec!["0000:01:00.1".into()],
        }],
        ..GpuMachineStatus::default()
    });
    m
}

fn workstation() -> (GpuNode, Node) {
    let mut gn = GpuNode::new(
        "ws",
        GpuNodeSpec {
            node_name: "ws".into(),
            unschedulable: false,
        },
    );
    gn.status = Some(GpuNodeStatus {
        devices: vec![GpuDevice {
            pci_address: "0000:01:00.0".into(),
            vendor_id: "10de".into(),
            device_id: "26b9".into(),
            model: "l40s".into(),
            iommu_group: Some(12),
            iommu_group_members: vec![
                IommuMember {
                    pci_address: "0000:01:00.0".into(),
                    role: MemberRole::Gpu,
                },
                IommuMember {
                    pci_address: "0000:01:00.1".into(),
                    role: MemberRole::Companion,
                },
            ],
            numa_node: Some(0),
            pcie_parent: Some("0000:00:01.0".into()),
            driver: Some("vfio-pci".into()),
            healthy: true,
            reason: None,
        }],
        iommu_enabled: true,
        gpu_count: 1,
        healthy_count: 1,
        heartbeat: Some(Time(Timestamp::now())),
        ..GpuNodeStatus::default()
    });
    let mut node = Node::default();
    node.metadata.name = Some("ws".into());
    node.status = Some(NodeStatus {
        conditions: Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..NodeCondition::default()
        }]),
        ..NodeStatus::default()
    });
    (gn, node)
}

fn store_of<K>(items: Vec<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for item in items {
        writer.apply_watcher_event(&watcher::Event::InitApply(item));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

fn context(machines: Vec<GpuMachine>) -> (Arc<Context>, Server) {
    context_with(machines, vec![], tokio::sync::mpsc::unbounded_channel().0)
}

/// A context over the given machines and allocation records, every cache synced.
fn context_with(
    machines: Vec<GpuMachine>,
    records: Vec<GpuAllocation>,
    released: tokio::sync::mpsc::UnboundedSender<()>,
) -> (Arc<Context>, Server) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (gn, node) = workstation();
    let synced = Arc::new(Synced::default());
    for cache in [
        Cache::GpuMachine,
        Cache::GpuNode,
        Cache::Node,
        Cache::GpuAllocation,
    ] {
        synced.set(cache);
    }
    let ctx = Context::new(
        client,
        store_of(machines),
        store_of(vec![gn]),
        store_of(vec![node]),
        store_of(records),
        Arc::new(Metrics::new()),
        Settings::default(),
    )
    .with_release_notifier(released)
    .with_synced(synced);
    (Arc::new(ctx), Server::spawn(handle))
}

/// Node `ws`'s allocation record at `rv`, giving `owners` their status's GPUs.
fn record(rv: &str, owners: &[&GpuMachine]) -> GpuAllocation {
    let mut r = GpuAllocation::new("ws", Default::default());
    r.metadata.resource_version = Some(rv.into());
    for m in owners {
        let who = MachineRef {
            namespace: "default".into(),
            name: m.metadata.name.clone().unwrap(),
            uid: m.metadata.uid.clone().unwrap(),
        };
        r.spec
            .claim(&who, &m.status.as_ref().unwrap().gpus)
            .unwrap();
    }
    r
}

/// A written object as the server stores it: the body sent, at resourceVersion `rv`.
fn stored(body: &Value, rv: &str) -> Value {
    let mut stored = body.clone();
    stored["metadata"]["resourceVersion"] = json!(rv);
    stored
}

fn with_status(mut m: GpuMachine, body: &Value, rv: &str) -> GpuMachine {
    m.status = Some(serde_json::from_value(body["status"].clone()).unwrap());
    m.metadata.resource_version = Some(rv.into());
    m
}

async fn run(
    m: GpuMachine,
    ctx: &Arc<Context>,
) -> tokio::task::JoinHandle<Result<kube::runtime::controller::Action, Error>> {
    let ctx = ctx.clone();
    tokio::spawn(async move { reconcile(Arc::new(m), ctx).await })
}

/// Awaits a reconcile, failing the test instead of hanging if it waits on a reply the
/// scenario never scripted.
async fn finish(
    task: tokio::task::JoinHandle<Result<kube::runtime::controller::Action, Error>>,
) -> Result<kube::runtime::controller::Action, Error> {
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the reconcile is still waiting (on a request the scenario did not answer?)")
        .expect("the reconcile task panicked")
}

type Reconcile = tokio::task::JoinHandle<Result<kube::runtime::controller::Action, Error>>;

/// Starts reconciling machine `m` without the finalizer; returns its first request.
async fn reconcile_new_machine() -> (GpuMachine, Server, Reconcile, Call) {
    let mut m = machine("m");
    m.metadata.finalizers = None;
    let (ctx, mut server) = context(vec![m.clone()]);
    let task = run(m.clone(), &ctx).await;
    let call = server.next().await;
    (m, server, task, call)
}

#[tokio::test]
async fn a_new_machine_gets_the_finalizer_and_is_placed_in_the_same_reconcile() {
    let (m, mut server, task, call) = reconcile_new_machine().await;
    // A merge patch of the finalizers carrying the version read.
    assert_eq!(
        (call.method.clone(), call.path.as_str()),
        (Method::PATCH, &*format!("{MACHINES}/m"))
    );
    assert_eq!(
        call.body,
        json!({"metadata": {"finalizers": [keys::FINALIZER], "resourceVersion": "1"}})
    );
    let mut with = m.clone();
    with.metadata.finalizers = Some(vec![keys::FINALIZER.into()]);
    with.metadata.resource_version = Some("2".into());
    call.ok(&with);

    // Placement follows at once, on the version the patch returned: the record...
    let call = server.expect(Method::GET, &format!("{RECORDS}/ws")).await;
    call.error(404, "NotFound");
    let call = server.next().await;
    assert_eq!(call.method, Method::POST);
    let reply = stored(&call.body, "5");
    call.respond(StatusCode::CREATED, &reply);
    // ... and the status, written with the patched version.
    let call = server.next().await;
    assert_eq!(call.path, format!("{MACHINES}/m/status"));
    assert_eq!(call.body["metadata"]["resourceVersion"], "2");
    call.error(500, "InternalError");
    assert!(finish(task).await.is_err());
    server.done().await;
}

#[tokio::test]
async fn a_stale_copy_without_the_finalizer_is_retried_at_once() {
    let (_, mut server, task, call) = reconcile_new_machine().await;
    // The server has moved on (our own earlier patch, say): the precondition fails.
    assert_eq!(call.method, Method::PATCH);
    call.error(409, "Conflict");
    let error = finish(task).await.unwrap_err();
    assert_eq!(error.metric_label(), "conflict");
    assert!(error.backoff() < Duration::from_millis(200), "{error}");
    server.done().await;
}

#[tokio::test]
async fn a_stored_spec_the_operator_refuses_takes_no_gpu() {
    // Stored before the CRD's rules refused it: a hostPath volume.
    let mut m = machine("m");
    m.spec.volumes = vec![k8s_openapi::api::core::v1::Volume {
        name: "host".into(),
        host_path: Some(k8s_openapi::api::core::v1::HostPathVolumeSource {
            path: "/etc".into(),
            type_: None,
        }),
        ..Default::default()
    }];
    let (ctx, mut server) = context(vec![m.clone()]);
    let task = run(m.clone(), &ctx).await;
    // The only write is the status: no record is read or claimed.
    let call = server
        .expect(Method::PUT, &format!("{MACHINES}/m/status"))
        .await;
    let status: GpuMachineStatus = serde_json::from_value(call.body["status"].clone()).unwrap();
    assert_eq!(status.phase, Some(MachinePhase::Pending));
    assert!(
        status.gpus.is_empty() && status.node_name.is_none(),
        "{status:?}"
    );
    let scheduled = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Scheduled")
        .expect("a Scheduled condition");
    assert_eq!(
        (scheduled.status.as_str(), scheduled.reason.as_str()),
        ("False", "SpecRefused")
    );
    assert!(
        scheduled.message.contains("hostPath"),
        "{}",
        scheduled.message
    );
    let reply = stored(&call.body, "2");
    call.ok(&reply);
    finish(task)
        .await
        .expect("the reconcile ends, waiting for a new spec");
    server.done().await;
    // Told once: the same refusal again writes nothing.
    let again = with_status(m, &reply, "2");
    let task = run(again, &ctx).await;
    finish(task).await.expect("nothing to write");
    server.done().await;
}

#[tokio::test]
async fn the_record_commits_before_the_status_and_the_pod() {
    let m = machine("m");
    let (ctx, mut server) = context(vec![m.clone()]);
    let task = run(m.clone(), &ctx).await;

    // 1. No record in the cache: a quorum read finds none, so it is created.
    let call = server.expect(Method::GET, &format!("{RECORDS}/ws")).await;
    call.error(404, "NotFound");
    let call = server.expect(Method::POST, RECORDS).await;
    let devices = &call.body["spec"]["devices"];
    assert_eq!(devices["0000:01:00.0"]["uid"], "uid-m");
    assert_eq!(devices["0000:01:00.0"]["gpu"], "0000:01:00.0");
    assert_eq!(devices["0000:01:00.1"]["gpu"], "0000:01:00.0");
    let reply = stored(&call.body, "5");
    call.respond(StatusCode::CREATED, &reply);

    // 2. The status mirrors the record: an update of the status carrying the machine's
    // version.
    let call = server
        .expect(Method::PUT, &format!("{MACHINES}/m/status"))
        .await;
    assert_eq!(call.body["metadata"]["resourceVersion"], "1");
    let status = &call.body["status"];
    assert_eq!(status["nodeName"], "ws");
    // Written as the Pod about to be created makes it: one status write per placement.
    assert_eq!(status["phase"], "Booting");
    assert_eq!(status["gpus"][0]["pciAddress"], "0000:01:00.0");
    assert_eq!(status["gpus"][0]["companions"][0], "0000:01:00.1");
    assert_eq!(status["conditions"][0]["type"], "Scheduled");
    assert_eq!(status["conditions"][0]["status"], "True");
    assert_eq!(status["conditions"][0]["observedGeneration"], 1);
    assert_eq!(status["podName"], "m-vm");
    let after = with_status(m, &call.body, "3");
    call.ok(&after);

    // 3. In the same reconcile (the commit is as fresh as a read): the Pod.
    let call = server
        .expect(Method::POST, "/api/v1/namespaces/default/pods")
        .await;
    let pod: Pod = serde_json::from_value(call.body.clone()).unwrap();
    let ann = pod.metadata.annotations.clone().unwrap();
    assert_eq!(ann["gpuvm.dev/devices"], "0000:01:00.0,0000:01:00.1");
    assert_eq!(ann["gpuvm.dev/cpus"], "4");
    assert_eq!(ann["gpuvm.dev/memory"], "8Gi");
    assert_eq!(
        pod.spec.as_ref().unwrap().runtime_class_name.as_deref(),
        Some("gpuvm")
    );
    assert_eq!(
        pod.metadata.owner_references.as_ref().unwrap()[0].uid,
        "uid-m"
    );
    call.ok(&pod);
    // The Pod's name was in the one status write: nothing more to write.
    finish(task).await.unwrap();
    server.done().await;
}

#[tokio::test]
async fn of_two_writers_for_one_gpu_the_loser_takes_nothing() {
    let a = machine("a");
    let b = placed("b");
    // The cache shows an empty record at version 5; another replica has since given the
    // GPU to `b` (version 6).
    let (ctx, mut server) = context_with(
        vec![a.clone()],
        vec![record("5", &[])],
        tokio::sync::mpsc::unbounded_channel().0,
    );
    let task = run(a.clone(), &ctx).await;

    // The claim goes out as an update carrying version 5: the server says 409.
    let call = server.expect(Method::PUT, &format!("{RECORDS}/ws")).await;
    assert_eq!(call.body["metadata"]["resourceVersion"], "5");
    assert_eq!(call.body["spec"]["devices"]["0000:01:00.0"]["uid"], "uid-a");
    call.error(409, "Conflict");
    // A quorum read shows `b` holding it: `a` is refused, writes nothing, and retries.
    let call = server.expect(Method::GET, &format!("{RECORDS}/ws")).await;
    call.ok(&record("6", &[&b]));
    let action = finish(task).await.unwrap();
    assert!(
        format!("{action:?}").contains("requeue_after: Some"),
        "{action:?}"
    );
    server.done().await;

    // The retry sees `b`'s GPU taken: `a` is unschedulable, never handed the same GPU.
    let task = run(a.clone(), &ctx).await;
    let call = server.next().await;
    assert_eq!(call.path, format!("{MACHINES}/a/status"));
    let status = &call.body["status"];
    assert!(status.get("gpus").is_none(), "{status}");
    assert_eq!(status["phase"], "Pending");
    assert_eq!(status["conditions"][0]["reason"], "Unschedulable");
    assert_eq!(
        status["message"],
        "no node has 1 free healthy l40s GPU (1 node checked: 1 full)"
    );
    let reply = with_status(a, &call.body, "7");
    call.ok(&reply);
    finish(task).await.unwrap();
    server.done().await;
}

#[tokio::test]
async fn a_writer_whose_mirror_loses_gives_its_claim_back() {
    let a = machine("a");
    let (ctx, mut server) = context_with(
        vec![a.clone()],
        vec![record("5", &[])],
        tokio::sync::mpsc::unbounded_channel().0,
    );
    let task = run(a.clone(), &ctx).await;
    let call = server.next().await;
    assert_eq!(call.method, Method::PUT);
    let reply = stored(&call.body, "6");
    call.ok(&reply);
    // Another replica placed `a` first (on another node): our status write is refused...
    let call = server.next().await;
    assert_eq!(call.path, format!("{MACHINES}/a/status"));
    call.error(409, "Conflict");
    let call = server.expect(Method::GET, &format!("{MACHINES}/a")).await;
    let mut elsewhere = placed("a");
    elsewhere.status.as_mut().unwrap().node_name = Some("other".into());
    call.ok(&elsewhere);
    // ... so our entries on `ws` go back, as an update on the version we wrote.
    let call = server.expect(Method::PUT, &format!("{RECORDS}/ws")).await;
    assert_eq!(call.body["metadata"]["resourceVersion"], "6");
    assert!(call.body["spec"].get("devices").is_none(), "{}", call.body);
    let reply = stored(&call.body, "7");
    call.ok(&reply);
    finish(task).await.unwrap();
    server.done().await;
}

#[tokio::test]
async fn a_machine_the_record_already_gives_gpus_is_mirrored_not_placed_again() {
    // A crash between the commit and the mirror: the record holds `m`'s GPU, its status
    // says nothing.
    let m = machine("m");
    let (ctx, mut server) = context_with(
        vec![m.clone()],
        vec![record("5", &[&placed("m")])],
        tokio::sync::mpsc::unbounded_channel().0,
    );
    let task = run(m.clone(), &ctx).await;
    let call = server.next().await;
    assert_eq!(
        call.path,
        format!("{MACHINES}/m/status"),
        "no new claim is made"
    );
    assert_eq!(call.body["status"]["gpus"][0]["pciAddress"], "0000:01:00.0");
    assert_eq!(
        call.body["status"]["gpus"][0]["companions"][0],
        "0000:01:00.1"
    );
    let after = with_status(m, &call.body, "3");
    call.ok(&after);
    let call = server.next().await;
    assert_eq!(call.method, Method::POST);
    assert_eq!(call.body["metadata"]["name"], "m-vm");
    let created = call.body.clone();
    call.respond(StatusCode::CREATED, &created);
    finish(task).await.unwrap();
    server.done().await;
}

#[tokio::test]
async fn a_pod_that_disagrees_with_the_allocation_is_deleted() {
    let mut m = placed("m");
    m.status.as_mut().unwrap().pod_name = Some("m-vm".into());
    let (ctx, mut server) = context(vec![m.clone()]);
    let task = run(m.clone(), &ctx).await;
    let mut other = placed("m");
    other.status.as_mut().unwrap().gpus[0].pci_address = "0000:02:00.0".into();
    let stray = gpuvm_operator::pod::build_pod(&other).unwrap();
    server.next().await.ok(&stray);
    let call = server
        .expect(Method::DELETE, "/api/v1/namespaces/default/pods/m-vm")
        .await;
    call.ok(&stray);
    finish(task).await.unwrap();
    server.done().await;
}

fn pod(phase: &str, state: ContainerState, ready: bool) -> Pod {
    let mut p = gpuvm_operator::pod::build_pod(&placed("m")).unwrap();
    p.status = Some(PodStatus {
        phase: Some(phase.into()),
        container_statuses: Some(vec![ContainerStatus {
            name: "machine".into(),
            ready,
            state: Some(state),
            ..ContainerStatus::default()
        }]),
        ..PodStatus::default()
    });
    p
}

#[tokio::test]
async fn pod_state_is_mirrored_into_phase_and_conditions() {
    let mut m = placed("m");
    m.status.as_mut().unwrap().pod_name = Some("m-vm".into());
    m.status.as_mut().unwrap().phase = Some(MachinePhase::Booting);
    let (ctx, mut server) = context(vec![m.clone()]);
    let task = run(m.clone(), &ctx).await;

    let running = ContainerState {
        running: Some(ContainerStateRunning::default()),
        ..ContainerState::default()
    };
    let mut seen = pod("Running", running, true);
    // The guest sees its GPU (the node agent carried the shim's check to the Pod).
    seen.metadata.annotations.as_mut().unwrap().insert(
        keys::ANNOTATION_GPU_CHECK.to_owned(),
        "ok: 1 x l40s".to_owned(),
    );
    server.next().await.ok(&seen);
    let call = server.next().await;
    assert_eq!(call.path, format!("{MACHINES}/m/status"));
    let status: GpuMachineStatus = serde_json::from_value(call.body["status"].clone()).unwrap();
    assert_eq!(status.phase, Some(MachinePhase::Running));
    let ready = status.condition(gpuvm_api::ConditionType::Ready).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Running")
    );
    let vm = status.condition(gpuvm_api::ConditionType::VmReady).unwrap();
    assert_eq!(vm.status, "True");
    let gpu = status
        .condition(gpuvm_api::ConditionType::GpuReady)
        .unwrap();
    assert_eq!(gpu.status, "True");
    // The Pod runs the machine's spec: its generation is observed.
    assert_eq!(status.observed_generation, Some(1));
    let reply = with_status(m, &call.body, "8");
    call.ok(&reply);
    finish(task).await.unwrap();
    server.done().await;
}

#[tokio::test]
async fn a_failed_pod_is_replaced_on_the_same_gpus_under_on_failure() {
    let mut m = placed("m");
    m.spec.restart_policy = RestartPolicy::OnFailure;
    m.status.as_mut().unwrap().pod_name = Some("m-vm".into());
    m.status.as_mut().unwrap().phase = Some(MachinePhase::Running);
    let (ctx, mut server) = context(vec![m.clone()]);
    let task = run(m.clone(), &ctx).await;

    let failed = ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: 3,
            reason: Some("Error".into()),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    };
    server.next().await.ok(&pod("Failed", failed, false));
    // Crash-safe order: the restart count, the next Pod's name and the evidence are
    // written (carrying the machine's resourceVersion) before the old Pod is deleted.
    let call = server
        .expect(Method::PUT, &format!("{MACHINES}/m/status"))
        .await;
    assert_eq!(call.body["metadata"]["resourceVersion"], "1");
    let status: GpuMachineStatus = serde_json::from_value(call.body["status"].clone()).unwrap();
    assert_eq!(status.restarts, 1);
    assert_eq!(status.pod_index, 1);
    assert_eq!(status.pod_name.as_deref(), Some("m-vm-1"));
    assert_eq!(status.exit_code, Some(3));
    assert_eq!(status.last_termination.as_ref().unwrap().exit_code, 3);
    assert_eq!(status.phase, Some(MachinePhase::Scheduled));
    assert!(status.next_restart_time.is_some(), "the restart backs off");
    // Same GPUs: the allocation is untouched.
    assert_eq!(status.gpus, m.status.as_ref().unwrap().gpus);
    let mut next = with_status(m, &call.body, "9");
    call.ok(&next);
    let call = server
        .expect(Method::DELETE, "/api/v1/namespaces/default/pods/m-vm")
        .await;
    call.ok(&pod("Failed", ContainerState::default(), false));
    finish(task).await.unwrap();
    server.done().await;

    // The back-off has run out. The old Pod is still terminating: no new Pod yet.
    next.status.as_mut().unwrap().next_restart_time = Some(Time(Timestamp::UNIX_EPOCH));
    let task = run(next.clone(), &ctx).await;
    let call = server.next().await;
    assert_eq!(call.path, "/api/v1/namespaces/default/pods/m-vm-1");
    call.error(404, "NotFound");
    let call = server
        .expect(Method::GET, "/api/v1/namespaces/default/pods")
        .await;
    let mut old = pod("Failed", ContainerState::default(), false);
    old.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    call.ok(&json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [old]}));
    let call = server.next().await;
    assert_eq!(call.path, format!("{MACHINES}/m/status"));
    assert!(
        call.body["status"]["message"]
            .as_str()
            .unwrap()
            .contains("waiting for Pod m-vm to be gone"),
        "{}",
        call.body["status"]
    );
    let next = with_status(next, &call.body, "10");
    call.ok(&next);
    finish(task).await.unwrap();
    server.done().await;

    // Gone: the replacement Pod is named for the restart and created once a quorum read
    // of the record shows the allocation still current.
    let task = run(next.clone(), &ctx).await;
    let call = server.next().await;
    assert_eq!(call.path, "/api/v1/namespaces/default/pods/m-vm-1");
    call.error(404, "NotFound");
    server
        .next()
        .await
        .ok(&json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}));
    let call = server.expect(Method::GET, &format!("{RECORDS}/ws")).await;
    call.ok(&record("9", &[&next]));
    let call = server.next().await;
    assert_eq!(call.method, Method::POST);
    assert_eq!(call.body["metadata"]["name"], "m-vm-1");
    assert_eq!(
        call.body["metadata"]["annotations"]["gpuvm.dev/devices"],
        "0000:01:00.0,0000:01:00.1"
    );
    let created = call.body.clone();
    call.respond(StatusCode::CREATED, &created);
    let call = server.next().await;
    assert_eq!(call.path, format!("{MACHINES}/m/status"));
    assert_eq!(call.body["status"]["podName"], "m-vm-1");
    assert!(call.body["status"].get("nextRestartTime").is_none());
    let reply = with_status(next, &call.body, "11");
    call.ok(&reply);
    finish(task).await.unwrap();
    server.done().await;
}

#[tokio::test]
async fn deletion_waits_for_the_pod_before_releasing_the_gpus() {
    let mut m = placed("m");
    m.status.as_mut().unwrap().pod_name = Some("m-vm".into());
    m.status.as_mut().unwrap().phase = Some(MachinePhase::Running);
    m.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let (tx, mut released) = tokio::sync::mpsc::unbounded_channel();
    let (ctx, mut server) = context_with(vec![m.clone()], vec![record("5", &[&m])], tx);

    // First pass: the Pod exists -> Terminating, delete it, and keep the finalizer.
    let task = run(m.clone(), &ctx).await;
    let call = server
        .expect(Method::GET, "/api/v1/namespaces/default/pods")
        .await;
    assert!(
        call.query.contains("labelSelector=gpuvm.dev%2Fmachine%3Dm"),
        "{}",
        call.query
    );
    let running = pod("Running", ContainerState::default(), true);
    call.ok(&json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [running]}));
    let call = server.next().await;
    assert_eq!(call.path, format!("{MACHINES}/m/status"));
    assert_eq!(call.body["status"]["phase"], "Terminating");
    let terminating = with_status(m.clone(), &call.body, "10");
    call.ok(&terminating);
    let call = server
        .expect(Method::DELETE, "/api/v1/namespaces/default/pods/m-vm")
        .await;
    call.ok(&running);
    let err = finish(task).await.unwrap_err();
    assert_eq!(err.metric_label(), "pods_terminating", "{err}");
    assert!(
        released.try_recv().is_err(),
        "GPUs are not released while the Pod exists"
    );
    server.done().await;

    // Second pass: the Pod is gone -> the record gives the GPUs back, then the
    // finalizer is removed.
    let task = run(terminating.clone(), &ctx).await;
    server
        .next()
        .await
        .ok(&json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}));
    let call = server.expect(Method::PUT, &format!("{RECORDS}/ws")).await;
    assert_eq!(call.body["metadata"]["resourceVersion"], "5");
    assert!(call.body["spec"].get("devices").is_none(), "{}", call.body);
    let reply = stored(&call.body, "6");
    call.ok(&reply);
    let call = server.expect(Method::PATCH, &format!("{MACHINES}/m")).await;
    assert!(call.body.to_string().contains("remove"), "{}", call.body);
    let mut gone = terminating;
    gone.metadata.finalizers = None;
    call.ok(&gone);
    finish(task).await.unwrap();
    server.done().await;
    assert!(gone.meta().finalizers.is_none());
    // Machines waiting for GPUs are woken now, not at their next periodic retry.
    assert!(released.try_recv().is_ok(), "release was not signalled");
}
