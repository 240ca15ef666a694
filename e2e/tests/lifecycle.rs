//! A machine's lifecycle against a real kube-apiserver, the operator as a child process,
//! and the test playing kubelet (there is none): it binds Pods to their node, so that a
//! delete is graceful and the Pod stays until "its VM is gone" (the test deletes it with
//! grace 0), and writes Pod status as kubelet would.
//!
//! Spec roll-out, restart back-off and crash-safe bookkeeping, no adoption of a Pod the
//! machine does not own, the evidence of a finished machine, and `Ready` waiting for the
//! in-guest GPU check. Every test prints `SKIPPED: <reason>` and passes when no API
//! server is configured (it fails instead under `GPUVM_REQUIRE=apiserver`).

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use gpuvm_api::{
    ConditionType, GpuAllocation, GpuCheckPolicy, GpuMachine, MachinePhase, RestartPolicy, keys,
};
use gpuvm_e2e::fixtures::{binding, pod_ended_patch, pod_running_patch};
use gpuvm_e2e::{Check, HostKind, TestEnv, eventually, generation_observed, note};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Resource as _, ResourceExt as _};
use serde_json::{Value, json};

/// How long anything the operator does on its own may take.
const T: Duration = Duration::from_secs(60);
/// The finalizer the test puts on a Pod to stand for its VM's teardown.
const TEARDOWN: &str = "gpuvm.dev/e2e-vm-teardown";

fn condition(m: &GpuMachine, kind: ConditionType) -> Option<&Condition> {
    m.status.as_ref().and_then(|s| s.condition(kind))
}

/// `Ready` has this status and reason.
fn ready_is(status: &'static str, reason: &'static str) -> impl Fn(&GpuMachine) -> Check<()> {
    move |m| match condition(m, ConditionType::Ready) {
        Some(c) if c.status == status && c.reason == reason => Ok(()),
        other => Err(format!("Ready {other:?}")),
    }
}

/// The test as kubelet: binds, runs, ends and finally removes the machine's Pods.
struct Kubelet<'a> {
    env: &'a TestEnv,
}

impl Kubelet<'_> {
    /// Binds the Pod to `node`, as kube-scheduler would.
    async fn bind(&self, pod: &str, node: &str) -> anyhow::Result<()> {
        self.env
            .pods()
            .create_subresource::<_, Value>(
                "binding",
                pod,
                &PostParams::default(),
                &binding(pod, node),
            )
            .await
            .with_context(|| format!("binding Pod {pod} to {node}"))?;
        Ok(())
    }

    async fn status(&self, pod: &str, patch: &Value) -> anyhow::Result<()> {
        self.env
            .pods()
            .patch_status(pod, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .with_context(|| format!("writing the status of Pod {pod}"))?;
        Ok(())
    }

    /// The VM booted and the container runs, ready.
    async fn run(&self, pod: &str, image: &str) -> anyhow::Result<()> {
        self.status(pod, &pod_running_patch(image, true)).await
    }

    /// The container ended.
    async fn end(&self, pod: &str, image: &str, code: i32, log_tail: &str) -> anyhow::Result<()> {
        self.status(pod, &pod_ended_patch(image, code, log_tail, 5))
            .await
    }

    /// The node agent carries the shim's in-guest GPU check to the Pod.
    async fn gpu_check(&self, pod: &str, value: &str) -> anyhow::Result<()> {
        self.env
            .pods()
            .patch(
                pod,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"annotations": {keys::ANNOTATION_GPU_CHECK: value}}}),
                ),
            )
            .await
            .with_context(|| format!("annotating Pod {pod}"))?;
        Ok(())
    }

    /// Keeps the Pod object after its delete until [`Kubelet::confirm_gone`], as a VM
    /// still being torn down would. Needed for a Pod that ended: the API server deletes
    /// a Pod in a terminal phase at once, grace period or not.
    async fn hold(&self, pod: &str) -> anyhow::Result<()> {
        self.env
            .pods()
            .patch(
                pod,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": [TEARDOWN]}})),
            )
            .await
            .with_context(|| format!("holding Pod {pod}"))?;
        Ok(())
    }

    /// The VM is gone: the terminating Pod is removed (grace 0, as kubelet confirms).
    async fn confirm_gone(&self, pod: &str) -> anyhow::Result<()> {
        let release = self
            .env
            .pods()
            .patch(
                pod,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await;
        match release {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(e).with_context(|| format!("releasing Pod {pod}")),
        }
        match self
            .env
            .pods()
            .delete(pod, &DeleteParams::default().grace_period(0))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(e).with_context(|| format!("removing Pod {pod}")),
        }
        self.env.wait_gone(&self.env.pods(), pod, T).await
    }
}

/// Waits until Pod `name` is terminating (has a deletionTimestamp).
async fn wait_terminating(env: &TestEnv, name: &str) -> anyhow::Result<Pod> {
    let pods = env.pods();
    eventually(&format!("Pod {name} to be terminating"), T, || {
        let pods = pods.clone();
        async move {
            Ok(match pods.get_opt(name).await? {
                Some(p) if p.metadata.deletion_timestamp.is_some() => Ok(p),
                Some(_) => Err("no deletionTimestamp yet".to_owned()),
                None => Err("gone (a held Pod must wait for its kubelet)".to_owned()),
            })
        }
    })
    .await
}

/// Waits for an Event with `reason` about machine `name`; returns its note.
async fn wait_event(env: &TestEnv, name: &str, reason: &str) -> anyhow::Result<String> {
    eventually(&format!("a {reason} Event for {name}"), T, || async move {
        Ok(match env.events(name, reason).await?.first() {
            Some(e) => Ok(e.note.clone().unwrap_or_default()),
            None => Err("none yet".to_owned()),
        })
    })
    .await
}

fn status_of(m: &GpuMachine) -> anyhow::Result<&gpuvm_api::GpuMachineStatus> {
    m.status.as_ref().context("the machine has no status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_change_replaces_the_pod_on_the_same_gpus_once_the_old_one_is_gone()
-> anyhow::Result<()> {
    let Some((env, ws, mut op)) =
        TestEnv::with_operator("rollout", HostKind::L40sWorkstation, 1).await?
    else {
        return Ok(());
    };
    let kubelet = Kubelet { env: &env };
    let result = async {
        let mut m = env.machine("m", "l40s", 1);
        let first = env.apply(&m).await?;
        let gen1 = first.metadata.generation;
        env.wait_pod("m-vm", T).await?;
        kubelet.bind("m-vm", &ws[0]).await?;
        kubelet.run("m-vm", &m.spec.image).await?;
        kubelet.gpu_check("m-vm", "ok: 1 x l40s").await?;
        let running = env
            .wait_machine("m", "Ready and generation 1 observed", T, |m| {
                ready_is("True", "Running")(m)?;
                generation_observed(m)
            })
            .await?;
        let devices = status_of(&running)?.devices();

        // A new image: a new generation.
        m.spec.image = "nvcr.io/nvidia/pytorch:24.06-py3".to_owned();
        let changed = env.apply(&m).await?;
        let gen2 = changed.metadata.generation;
        ensure!(gen2 > gen1, "generation {gen2:?} after {gen1:?}");
        // The next Pod's name is written, then the old Pod deleted; it stays (bound)
        // until its VM is gone, and the new Pod waits for it.
        wait_terminating(&env, "m-vm").await?;
        let waiting = env
            .wait_machine("m", "waiting for m-vm to be gone", T, |m| {
                let s = m.status.as_ref().ok_or("no status")?;
                let message = s.message.clone().unwrap_or_default();
                if s.pod_name.as_deref() == Some("m-vm-1")
                    && message.contains("waiting for Pod m-vm")
                {
                    Ok(())
                } else {
                    Err(format!("podName {:?}, message {message:?}", s.pod_name))
                }
            })
            .await?;
        let s = status_of(&waiting)?;
        ensure!(
            s.observed_generation == gen1,
            "observedGeneration {:?} while the Pod of generation {gen1:?} is still the last one",
            s.observed_generation
        );
        ensure!(
            s.pod_index == 1 && s.restarts == 0,
            "podIndex {} restarts {}",
            s.pod_index,
            s.restarts
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        ensure!(
            env.pods().get_opt("m-vm-1").await?.is_none(),
            "the new Pod was created while the old one still held the GPU"
        );
        let note_text = wait_event(&env, "m", "RollingOut").await?;
        ensure!(note_text.contains("image"), "RollingOut Event: {note_text}");
        note(&format!("e2e: rollout: {note_text}"));

        // The old VM is gone: the new Pod comes, on the same GPUs, with the new image.
        kubelet.confirm_gone("m-vm").await?;
        let pod = env.wait_pod("m-vm-1", T).await?;
        let spec = pod.spec.clone().context("the Pod has no spec")?;
        ensure!(
            spec.containers[0].image.as_deref() == Some(m.spec.image.as_str()),
            "image {:?}",
            spec.containers[0].image
        );
        let annotations = pod.annotations();
        ensure!(
            annotations.get(keys::ANNOTATION_DEVICES) == Some(&devices.join(",")),
            "devices {:?}, before {devices:?}",
            annotations.get(keys::ANNOTATION_DEVICES)
        );
        ensure!(
            annotations.get(keys::ANNOTATION_GENERATION) == gen2.map(|g| g.to_string()).as_ref(),
            "generation annotation {:?}",
            annotations.get(keys::ANNOTATION_GENERATION)
        );
        // Nothing changed the spec since: the current generation is generation 2.
        let booted = env.wait_generation_observed("m", T).await?;
        ensure!(
            booted.metadata.generation == gen2,
            "generation {:?}, want {gen2:?}",
            booted.metadata.generation
        );
        ensure!(
            status_of(&booted)?.devices() == devices,
            "the GPUs changed in a roll-out"
        );
        env.check_invariants().await?;
        Ok(())
    }
    .await;
    env.finish(result, &mut [&mut op]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_back_off_and_wait_for_the_old_pod_after_the_bookkeeping_is_written()
-> anyhow::Result<()> {
    let Some((env, ws, mut op)) =
        TestEnv::with_operator("backoff", HostKind::L40sWorkstation, 1).await?
    else {
        return Ok(());
    };
    let kubelet = Kubelet { env: &env };
    let result = async {
        let mut m = env.machine("m", "l40s", 1);
        m.spec.restart_policy = RestartPolicy::OnFailure;
        env.apply(&m).await?;
        let image = m.spec.image.clone();
        env.wait_pod("m-vm", T).await?;
        kubelet.bind("m-vm", &ws[0]).await?;
        kubelet.hold("m-vm").await?;
        kubelet.run("m-vm", &image).await?;
        env.wait_machine("m", "Running", T, |m| {
            (m.phase() == MachinePhase::Running)
                .then_some(())
                .ok_or(format!("phase {}", m.phase()))
        })
        .await?;

        // The first failure.
        let failed_at = Instant::now();
        kubelet
            .end("m-vm", &image, 3, "step 41\nstep 42: NCCL error: unhandled system error\n")
            .await?;
        // Once the old Pod is being deleted, the restart is already on record.
        wait_terminating(&env, "m-vm").await?;
        let after = env.machines().get("m").await?;
        let s = status_of(&after)?;
        ensure!(
            s.restarts == 1 && s.pod_name.as_deref() == Some("m-vm-1") && s.pod_index == 1,
            "the old Pod was deleted before the bookkeeping was written: restarts {}, podName {:?}, podIndex {}",
            s.restarts,
            s.pod_name,
            s.pod_index
        );
        ensure!(s.consecutive_restarts == 1, "consecutiveRestarts {}", s.consecutive_restarts);
        let next = s.next_restart_time.clone().context("no nextRestartTime")?;
        let wait_s = next.0.as_second() - k8s_openapi::jiff::Timestamp::now().as_second()
            + i64::try_from(failed_at.elapsed().as_secs()).unwrap_or(0);
        ensure!((8..=13).contains(&wait_s), "first back-off {wait_s} s, want 10");
        let ready = condition(&after, ConditionType::Ready).context("no Ready")?;
        ensure!(ready.reason == "CrashLoopBackOff", "Ready {ready:?}");
        let last = s.last_termination.clone().context("no lastTermination")?;
        ensure!(
            last.exit_code == 3 && last.message.as_deref().unwrap_or_default().contains("NCCL error"),
            "lastTermination {last:?}"
        );
        let backoff = wait_event(&env, "m", "BackOff").await?;
        ensure!(backoff.contains("back-off 10s"), "BackOff Event: {backoff}");
        note(&format!("e2e: backoff: {backoff}"));

        // The back-off runs out while the old VM is still there: still no new Pod.
        let due = Duration::from_secs(u64::try_from(wait_s).unwrap_or(10) + 1);
        tokio::time::sleep(due.saturating_sub(failed_at.elapsed())).await;
        ensure!(
            env.pods().get_opt("m-vm-1").await?.is_none(),
            "the replacement was created while the old Pod still held the GPU"
        );
        env.wait_machine("m", "waiting for the old Pod", T, |m| {
            let message = m.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default();
            if message.contains("waiting for Pod m-vm") {
                Ok(())
            } else {
                Err(format!("message {message:?}"))
            }
        })
        .await?;
        kubelet.confirm_gone("m-vm").await?;
        let pod = env.wait_pod("m-vm-1", T).await?;
        let created = pod
            .metadata
            .creation_timestamp
            .clone()
            .context("no creationTimestamp")?;
        ensure!(
            created.0 >= next.0,
            "the replacement was created at {} before the back-off ended at {}",
            created.0,
            next.0
        );

        // A second quick failure: the wait doubles.
        kubelet.run("m-vm-1", &image).await?;
        kubelet.end("m-vm-1", &image, 4, "again\n").await?;
        let second = env
            .wait_machine("m", "the second restart", T, |m| {
                let s = m.status.as_ref().ok_or("no status")?;
                if s.restarts == 2 {
                    Ok(())
                } else {
                    Err(format!("restarts {}", s.restarts))
                }
            })
            .await?;
        let s = status_of(&second)?;
        let next = s.next_restart_time.clone().context("no nextRestartTime")?;
        let left = next.0.as_second() - k8s_openapi::jiff::Timestamp::now().as_second();
        ensure!((15..=21).contains(&left), "second back-off: {left} s left, want about 20");
        ensure!(
            (s.consecutive_restarts, s.pod_name.as_deref()) == (2, Some("m-vm-2")),
            "consecutiveRestarts {}, podName {:?}",
            s.consecutive_restarts,
            s.pod_name
        );
        // Unbound, m-vm-1 goes at once; m-vm-2 still waits for its back-off.
        env.wait_gone(&env.pods(), "m-vm-1", T).await?;
        ensure!(
            env.pods().get_opt("m-vm-2").await?.is_none(),
            "m-vm-2 was created before its back-off"
        );
        Ok(())
    }
    .await;
    env.finish(result, &mut [&mut op]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_under_the_machines_pod_name_that_it_does_not_own_is_not_adopted()
-> anyhow::Result<()> {
    let Some((env, _, mut op)) =
        TestEnv::with_operator("adoption", HostKind::L40sWorkstation, 1).await?
    else {
        return Ok(());
    };
    let result = async {
        // Someone else's Pod, with the machine's label and its Pod's name.
        let foreign = Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("m-vm".to_owned()),
                labels: Some([(keys::LABEL_MACHINE.to_owned(), "m".to_owned())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".to_owned(),
                    image: Some("busybox:1.36".to_owned()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: None,
        };
        env.pods().create(&PostParams::default(), &foreign).await?;
        let applied = env.apply(&env.machine("m", "l40s", 1)).await?;
        let uid = applied.uid().context("the machine has no uid")?;
        let m = env
            .wait_machine(
                "m",
                "Ready=False PodNotOwned",
                T,
                ready_is("False", "PodNotOwned"),
            )
            .await?;
        let message = m
            .status
            .as_ref()
            .and_then(|s| s.message.clone())
            .unwrap_or_default();
        ensure!(message.contains("not adopted"), "message {message:?}");
        let event = wait_event(&env, "m", "PodNotOwned").await?;
        note(&format!("e2e: adoption: {event}"));
        let pod = env.pods().get("m-vm").await?;
        ensure!(
            pod.owner_references().is_empty() && pod.metadata.deletion_timestamp.is_none(),
            "the foreign Pod was touched: owners {:?}, deletionTimestamp {:?}",
            pod.owner_references(),
            pod.metadata.deletion_timestamp
        );
        ensure!(
            pod.spec.as_ref().map(|s| s.containers[0].image.clone())
                == Some(Some("busybox:1.36".to_owned())),
            "the foreign Pod changed"
        );
        // Once it is gone, the machine's own Pod takes the name.
        env.pods()
            .delete("m-vm", &DeleteParams::default().grace_period(0))
            .await?;
        let own = eventually("the machine's own Pod m-vm", T, || {
            let pods = env.pods();
            let uid = uid.clone();
            async move {
                Ok(match pods.get_opt("m-vm").await? {
                    Some(p)
                        if p.owner_references()
                            .iter()
                            .any(|o| o.uid == uid && o.controller == Some(true)) =>
                    {
                        Ok(p)
                    }
                    Some(p) => Err(format!("owners {:?}", p.owner_references())),
                    None => Err("no Pod".to_owned()),
                })
            }
        })
        .await?;
        ensure!(own.meta().uid.is_some(), "no uid");
        env.check_invariants().await?;
        Ok(())
    }
    .await;
    env.finish(result, &mut [&mut op]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_machine_keeps_its_exit_code_and_log_tail_and_frees_its_gpus()
-> anyhow::Result<()> {
    let Some((env, ws, mut op)) =
        TestEnv::with_operator("evidence", HostKind::L40sWorkstation, 1).await?
    else {
        return Ok(());
    };
    let kubelet = Kubelet { env: &env };
    let result = async {
        let m = env.machine("m", "l40s", 1);
        let applied = env.apply(&m).await?;
        let pod = env.wait_pod("m-vm", T).await?;
        let container = &pod.spec.as_ref().context("no Pod spec")?.containers[0];
        ensure!(
            container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError"),
            "terminationMessagePolicy {:?}",
            container.termination_message_policy
        );
        kubelet.run("m-vm", &m.spec.image).await?;
        let log = "epoch 3/3\nTraceback (most recent call last):\nRuntimeError: CUDA error: an illegal memory access was encountered\n";
        kubelet.end("m-vm", &m.spec.image, 2, log).await?;
        let done = env
            .wait_machine("m", "Failed with its Pod gone", T, |m| {
                let s = m.status.as_ref().ok_or("no status")?;
                if m.phase() == MachinePhase::Failed && s.pod_name.is_none() {
                    Ok(())
                } else {
                    Err(format!("phase {}, podName {:?}", m.phase(), s.pod_name))
                }
            })
            .await?;
        let s = status_of(&done)?;
        let last = s.last_termination.clone().context("no lastTermination")?;
        ensure!(s.exit_code == Some(2), "exitCode {:?}", s.exit_code);
        ensure!(
            last.pod_name == "m-vm"
                && last.exit_code == 2
                && last.reason.as_deref() == Some("Error")
                && last.message.as_deref() == Some(log)
                && last.started_at.is_some()
                && last.finished_at.is_some(),
            "lastTermination {last:?}"
        );
        env.wait_gone(&env.pods(), "m-vm", T).await?;
        // The evidence outlives the Pod, and the GPUs go back.
        let node = &ws[0];
        let uid = applied.uid().unwrap_or_default();
        eventually("the record to give the GPU back", T, || async {
            let record = Api::<GpuAllocation>::all(env.client.clone()).get(node).await?;
            let held = record.spec.holdings(&uid);
            Ok(if held.is_empty() {
                Ok(())
            } else {
                Err(format!("still holds {held:?}"))
            })
        })
        .await?;
        Ok(())
    }
    .await;
    env.finish(result, &mut [&mut op]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_guest_to_see_its_gpus_unless_the_check_is_ignored()
-> anyhow::Result<()> {
    let Some((env, _, mut op)) =
        TestEnv::with_operator("gpu-ready", HostKind::L40sWorkstation, 2).await?
    else {
        return Ok(());
    };
    let kubelet = Kubelet { env: &env };
    let result = async {
        let strict = env.machine("strict", "l40s", 1);
        let mut lax = env.machine("lax", "l40s", 1);
        lax.spec.gpu_check = GpuCheckPolicy::Ignored;
        env.apply(&strict).await?;
        env.apply(&lax).await?;
        for name in ["strict-vm", "lax-vm"] {
            env.wait_pod(name, T).await?;
            kubelet.run(name, &strict.spec.image).await?;
        }
        // No check reported yet: strict is not Ready, lax is.
        let m = env
            .wait_machine(
                "strict",
                "Ready=False AwaitingGpuCheck",
                T,
                ready_is("False", "AwaitingGpuCheck"),
            )
            .await?;
        let gpu = condition(&m, ConditionType::GpuReady).context("no GPUReady")?;
        ensure!(gpu.status == "Unknown", "GPUReady {gpu:?}");
        ensure!(m.phase() == MachinePhase::Running, "phase {}", m.phase());
        env.wait_machine(
            "lax",
            "Ready=True with the check ignored",
            T,
            ready_is("True", "Running"),
        )
        .await?;

        // The guest does not see its GPU: still not Ready, and lax stays Ready.
        kubelet
            .gpu_check("strict-vm", "failed: guest sees 0 GPUs, expected 1")
            .await?;
        kubelet
            .gpu_check("lax-vm", "failed: guest sees 0 GPUs, expected 1")
            .await?;
        let m = env
            .wait_machine(
                "strict",
                "Ready=False GpuCheckFailed",
                T,
                ready_is("False", "GpuCheckFailed"),
            )
            .await?;
        let ready = condition(&m, ConditionType::Ready).context("no Ready")?;
        ensure!(
            ready.message.contains("guest sees 0 GPUs"),
            "Ready {ready:?}"
        );
        let lax_now = env
            .wait_machine("lax", "GPUReady=False", T, |m| {
                match condition(m, ConditionType::GpuReady) {
                    Some(c) if c.status == "False" => Ok(()),
                    other => Err(format!("GPUReady {other:?}")),
                }
            })
            .await?;
        ready_is("True", "Running")(&lax_now).map_err(anyhow::Error::msg)?;

        // It does: Ready.
        kubelet.gpu_check("strict-vm", "ok: 1 x l40s").await?;
        let m = env
            .wait_machine("strict", "Ready=True", T, ready_is("True", "Running"))
            .await?;
        let gpu = condition(&m, ConditionType::GpuReady).context("no GPUReady")?;
        ensure!(gpu.status == "True", "GPUReady {gpu:?}");
        Ok(())
    }
    .await;
    env.finish(result, &mut [&mut op]).await
}
