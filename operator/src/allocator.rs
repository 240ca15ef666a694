//! Writes the per-node [`GpuAllocation`] records: the compare-and-swap that decides who
//! owns a device.
//!
//! Every change is an `update` (PUT) carrying the resourceVersion that was read, so of
//! two writers that read the same version exactly one commits; the other gets a 409,
//! reads the record again and decides again from what it now says. Changes for one node
//! are batched: while one write to a node's record is in flight, the claims and releases
//! that arrive for that node queue up and go out together in the next write. That keeps
//! one writer per record in this process (no 409s against ourselves) and lets many
//! machines be placed on one node per round trip.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};

use gpuvm_api::{AllocatedGpu, Clash, GpuAllocation, GpuAllocationSpec, MachineRef};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use tokio::sync::{Mutex, oneshot};
use tracing::debug;

/// How many times one batch is re-decided after conflicts before its callers are told
/// to retry later.
const MAX_ATTEMPTS: u32 = 8;

/// A change to one node's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Give `gpus` (with companions) to `owner`, unless someone else holds one of them.
    Claim {
        /// The machine.
        owner: MachineRef,
        /// What the scheduler chose.
        gpus: Vec<AllocatedGpu>,
    },
    /// Take back everything the machine with this uid holds.
    Release {
        /// The machine's uid.
        uid: String,
    },
}

/// What a committed batch says about one change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The record now says the machine owns exactly these GPUs on the node (what it
    /// asked for, or what it already held there).
    Held(Vec<AllocatedGpu>),
    /// Another machine owns one of the devices; nothing was written for this claim.
    Clash(Clash),
    /// The machine holds nothing on the node any more.
    Released,
}

/// Why a change could not be committed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CommitError {
    /// The API server refused or could not be reached.
    #[error("could not write the GpuAllocation of node {node}: {message}")]
    Api {
        /// The node.
        node: String,
        /// The API error, as text (one error answers a whole batch).
        message: String,
    },
    /// The record kept changing under us.
    #[error("the GpuAllocation of node {0} kept changing; retrying later")]
    Contended(String),
    /// The write was abandoned (the process is shutting down).
    #[error("the allocation write for node {0} was abandoned")]
    Abandoned(String),
}

/// Applies one change to a record's spec: pure, the decision of the compare-and-swap.
pub fn decide(spec: &mut GpuAllocationSpec, op: &Op) -> Outcome {
    match op {
        Op::Claim { owner, gpus } => match spec.claim(owner, gpus) {
            Ok(held) => Outcome::Held(held),
            Err(clash) => Outcome::Clash(clash),
        },
        Op::Release { uid } => {
            spec.release(uid);
            Outcome::Released
        }
    }
}

type Answer = oneshot::Sender<Result<Outcome, CommitError>>;

#[derive(Default)]
struct Slot {
    queue: StdMutex<Vec<(Op, Answer)>>,
    /// Held while writing; holds the newest version of the record this process knows.
    latest: Mutex<Option<Arc<GpuAllocation>>>,
    /// `latest` after each write (the same allocation, shared), readable while the next
    /// write is in flight.
    snapshot: StdMutex<Option<Arc<GpuAllocation>>>,
}

/// Commits claims and releases to the GpuAllocation records, batched per node.
pub struct Committer {
    api: Api<GpuAllocation>,
    cache: Store<GpuAllocation>,
    slots: StdMutex<HashMap<String, Arc<Slot>>>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer").finish_non_exhaustive()
    }
}

impl Committer {
    /// A committer writing through `client`, starting from what `cache` shows.
    pub fn new(client: Client, cache: Store<GpuAllocation>) -> Self {
        Committer {
            api: Api::all(client),
            cache,
            slots: StdMutex::new(HashMap::new()),
        }
    }

    fn slot(&self, node: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(node.to_owned()).or_default().clone()
    }

    /// The newest record of each node this process wrote or read (a write in flight
    /// does not hide the last one).
    pub fn newest(&self) -> Vec<Arc<GpuAllocation>> {
        let slots: Vec<Arc<Slot>> = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.values().cloned().collect()
        };
        slots
            .iter()
            .filter_map(|s| s.snapshot.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// Commits `op` to node `node`'s record, together with whatever else is queued for
    /// that node, and says what the committed record decided for it.
    pub async fn submit(&self, node: &str, op: Op) -> Result<Outcome, CommitError> {
        let slot = self.slot(node);
        let (tx, mut rx) = oneshot::channel();
        slot.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((op, tx));
        let mut latest = slot.latest.lock().await;
        // The writer before us may have taken our change along.
        if let Ok(answer) = rx.try_recv() {
            return answer;
        }
        let batch = std::mem::take(&mut *slot.queue.lock().unwrap_or_else(|e| e.into_inner()));
        self.write(node, &mut latest, batch).await;
        *slot.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = latest.clone();
        drop(latest);
        rx.await
            .unwrap_or_else(|_| Err(CommitError::Abandoned(node.to_owned())))
    }

    async fn write(
        &self,
        node: &str,
        latest: &mut Option<Arc<GpuAllocation>>,
        batch: Vec<(Op, Answer)>,
    ) {
        let api_error = |e: kube::Error| CommitError::Api {
            node: node.to_owned(),
            message: e.to_string(),
        };
        let mut fresh_read = false;
        for _ in 0..MAX_ATTEMPTS {
            let base = match latest.take() {
                Some(known) => known,
                None => match self.read(node, fresh_read).await {
                    Ok(r) => r,
                    Err(e) => return answer_all(batch, &Err(api_error(e))),
                },
            };
            let mut record = GpuAllocation::clone(&base);
            let outcomes: Vec<Outcome> = batch
                .iter()
                .map(|(op, _)| decide(&mut record.spec, op))
                .collect();
            // Nothing to write: the record did not change, or would be created empty.
            let unchanged = record.spec == base.spec
                && (base.metadata.resource_version.is_some() || record.spec.devices.is_empty());
            let clashed = outcomes.iter().any(|o| matches!(o, Outcome::Clash(_)));
            if (unchanged || clashed) && !fresh_read {
                // A refusal or a no-op decided on a copy that may be old could be wrong
                // (a device freed since, a claim made by another replica): decide it
                // again on a quorum read before answering.
                fresh_read = true;
                continue;
            }
            if unchanged {
                *latest = Some(base);
                return answer_each(batch, outcomes);
            }
            let result = if record.metadata.resource_version.is_none() {
                self.api.create(&PostParams::default(), &record).await
            } else {
                // The resourceVersion read travels in the object: a 409 if it moved.
                self.api
                    .replace(node, &PostParams::default(), &record)
                    .await
            };
            match result {
                Ok(mut written) => {
                    // Kept for every node: the server's `managedFields` (several times
                    // the record's own size) are never read.
                    written.metadata.managed_fields = None;
                    *latest = Some(Arc::new(written));
                    return answer_each(batch, outcomes);
                }
                Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => {
                    debug!(%node, "GpuAllocation changed under us; deciding again");
                    fresh_read = true;
                }
                Err(e) => return answer_all(batch, &Err(api_error(e))),
            }
        }
        answer_all(batch, &Err(CommitError::Contended(node.to_owned())));
    }

    /// The node's record: from the cache unless `fresh` (after a conflict), else by a
    /// quorum read; an empty, not yet created one when there is none.
    async fn read(&self, node: &str, fresh: bool) -> Result<Arc<GpuAllocation>, kube::Error> {
        if !fresh
            && let Some(cached) = self
                .cache
                .get(&kube::runtime::reflector::ObjectRef::new(node))
        {
            return Ok(cached);
        }
        let mut record = self
            .api
            .get_opt(node)
            .await?
            .unwrap_or_else(|| GpuAllocation {
                metadata: ObjectMeta {
                    name: Some(node.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: GpuAllocationSpec::default(),
            });
        record.metadata.managed_fields = None;
        Ok(Arc::new(record))
    }

    /// A quorum read of what `uid` holds on `node` (empty when nothing).
    pub async fn fresh_holdings(
        &self,
        node: &str,
        uid: &str,
    ) -> Result<Vec<AllocatedGpu>, kube::Error> {
        Ok(self
            .api
            .get_opt(node)
            .await?
            .map(|r| r.spec.holdings(uid))
            .unwrap_or_default())
    }
}

fn answer_each(batch: Vec<(Op, Answer)>, outcomes: Vec<Outcome>) {
    for ((_, tx), outcome) in batch.into_iter().zip(outcomes) {
        // A caller that went away no longer needs the answer.
        let _ = tx.send(Ok(outcome));
    }
}

fn answer_all(batch: Vec<(Op, Answer)>, answer: &Result<Outcome, CommitError>) {
    for (_, tx) in batch {
        let _ = tx.send(answer.clone());
    }
}

/// The resourceVersion as a number, to tell which of two copies of one record is newer
/// (etcd revisions; an unparsable one counts as oldest).
pub fn version(r: &GpuAllocation) -> u64 {
    r.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Per node, the newer of the cached record and the one this process last wrote. Shared,
/// not copied: placement looks at every record for every machine.
pub fn newest_records(
    cached: impl IntoIterator<Item = Arc<GpuAllocation>>,
    written: impl IntoIterator<Item = Arc<GpuAllocation>>,
) -> HashMap<String, Arc<GpuAllocation>> {
    let mut out: HashMap<String, Arc<GpuAllocation>> = HashMap::new();
    for r in cached.into_iter().chain(written) {
        let name = r.name_any();
        match out.get(&name) {
            Some(have) if version(have) >= version(&r) => {}
            _ => {
                out.insert(name, r);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node: &str, rv: &str, owner: &str, device: &str) -> GpuAllocation {
        let mut spec = GpuAllocationSpec::default();
        spec.claim(
            &MachineRef {
                namespace: "ns".into(),
                name: owner.into(),
                uid: owner.into(),
            },
            &[AllocatedGpu {
                pci_address: device.into(),
                model: "h100-80gb".into(),
                iommu_group: None,
                numa_node: None,
                companions: vec![],
            }],
        )
        .unwrap();
        GpuAllocation {
            metadata: ObjectMeta {
                name: Some(node.into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            spec,
        }
    }

    #[test]
    fn the_newer_copy_of_each_record_wins() {
        let cached = [record("a", "10", "m1", "x"), record("b", "30", "m2", "y")].map(Arc::new);
        let written = [record("a", "12", "m3", "z"), record("b", "20", "m4", "w")].map(Arc::new);
        let got = newest_records(cached, written);
        assert_eq!(version(&got["a"]), 12);
        assert_eq!(version(&got["b"]), 30);
        assert!(got["a"].spec.devices.contains_key("z"));
    }

    #[test]
    fn a_batch_decides_in_order_and_the_loser_takes_nothing() {
        let owner = |n: &str| MachineRef {
            namespace: "ns".into(),
            name: n.into(),
            uid: n.into(),
        };
        let gpu = AllocatedGpu {
            pci_address: "0000:1b:00.0".into(),
            model: "h100-80gb".into(),
            iommu_group: None,
            numa_node: None,
            companions: vec![],
        };
        let mut spec = GpuAllocationSpec::default();
        let first = decide(
            &mut spec,
            &Op::Claim {
                owner: owner("a"),
                gpus: vec![gpu.clone()],
            },
        );
        let second = decide(
            &mut spec,
            &Op::Claim {
                owner: owner("b"),
                gpus: vec![gpu.clone()],
            },
        );
        assert_eq!(first, Outcome::Held(vec![gpu.clone()]));
        assert!(matches!(second, Outcome::Clash(ref c) if c.holder == "ns/a"));
        assert!(spec.holdings("b").is_empty());
        assert_eq!(
            decide(&mut spec, &Op::Release { uid: "a".into() }),
            Outcome::Released
        );
        assert!(matches!(
            decide(
                &mut spec,
                &Op::Claim {
                    owner: owner("b"),
                    gpus: vec![gpu]
                }
            ),
            Outcome::Held(_)
        ));
    }
}
