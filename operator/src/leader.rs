//! Leader election with a `coordination.k8s.io/v1` Lease, so several replicas can run and
//! one reconciles, on the maintained `kube-lease-manager` crate.
//!
//! Nothing about who owns a GPU depends on this: allocation is a compare-and-swap on the
//! per-node records ([`crate::allocator`]), correct for any number of writers. Leader
//! election only keeps the followers from doing the work twice. That matters for one
//! property of the crate: it renews and takes over an expired Lease with patches that carry
//! no resourceVersion, so a leader whose renewal arrives after its Lease expired can
//! briefly overlap with the next one. This module gives up leading as soon as renewals
//! have failed for half the grace period, which keeps such overlaps rare, and any that
//! happens costs only retried writes.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (its Pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub duration: Duration,
}

impl LeaseConfig {
    /// The Lease duration in whole seconds (at least 3).
    pub fn seconds(&self) -> u64 {
        self.duration.as_secs().max(3)
    }

    /// How long before expiry the holder renews: a third of the duration (at least 1 s),
    /// always shorter than the duration, as the crate requires.
    pub fn grace_seconds(&self) -> u64 {
        (self.seconds() / 3).max(1)
    }
}

/// Why leader election could not start.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The Lease could not be read, created or written.
    #[error("leader election through Lease {lease} failed: {source}")]
    Lease {
        /// `namespace/name` of the Lease.
        lease: String,
        /// What the lease manager said.
        #[source]
        source: LeaseManagerError,
    },
}

/// A replica that leads. Dropping it stops renewing (the Lease then lapses); prefer
/// [`Leadership::release`] so a follower takes over at once.
#[derive(Debug)]
pub struct Leadership {
    manager: LeaseManager,
    grace: Duration,
    duration: Duration,
}

async fn manager(client: &Client, cfg: &LeaseConfig) -> Result<LeaseManager, LeaderError> {
    LeaseManagerBuilder::new(client.clone(), &cfg.name)
        .with_namespace(&cfg.namespace)
        .with_identity(&cfg.identity)
        .with_duration(cfg.seconds())
        .with_grace(cfg.grace_seconds())
        .build()
        .await
        .map_err(|source| LeaderError::Lease {
            lease: format!("{}/{}", cfg.namespace, cfg.name),
            source,
        })
}

/// Blocks until this replica leads. API errors are retried (logged), so a follower
/// survives an API server that is briefly away.
pub async fn acquire(client: &Client, cfg: &LeaseConfig) -> Leadership {
    let retry = Duration::from_secs(cfg.grace_seconds());
    let manager = loop {
        match manager(client, cfg).await {
            Ok(m) => break m,
            Err(e) => {
                warn!(error = %e, "could not set up leader election; retrying");
                tokio::time::sleep(retry).await;
            }
        }
    };
    info!(lease = %cfg.name, identity = %cfg.identity, "standing by for the lease");
    loop {
        match manager.changed().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                debug!(error = %e, "lease attempt failed");
                tokio::time::sleep(retry).await;
            }
        }
    }
    info!(lease = %cfg.name, identity = %cfg.identity, "became leader");
    Leadership {
        manager,
        grace: Duration::from_secs(cfg.grace_seconds()),
        duration: Duration::from_secs(cfg.seconds()),
    }
}

impl Leadership {
    /// Renews the Lease; returns when leadership is lost (another replica holds the
    /// Lease) or renewals have failed for half the grace period, before the Lease can
    /// lapse under another candidate's eyes. The caller must then stop reconciling.
    pub async fn lost(&self) {
        let mut failing_since: Option<Instant> = None;
        let mut last_error = Instant::now();
        loop {
            match self.manager.changed().await {
                Ok(true) => failing_since = None,
                Ok(false) => {
                    info!("lost the lease to another replica");
                    return;
                }
                Err(e) => {
                    let now = Instant::now();
                    // The crate retries only on the next renewal: an error long after the
                    // last one means the renewals in between succeeded.
                    if now.duration_since(last_error) > self.duration {
                        failing_since = None;
                    }
                    last_error = now;
                    let since = *failing_since.get_or_insert(now);
                    debug!(error = %e, "lease renewal failed");
                    if since.elapsed() >= self.grace / 2 {
                        warn!(error = %e, "could not renew the lease in time");
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Gives the Lease up (on shutdown), so a follower need not wait for it to expire.
    pub async fn release(&self) {
        if let Err(e) = self.manager.release().await {
            warn!(error = %e, "could not release the lease; it expires on its own");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_is_always_shorter_than_the_duration() {
        for secs in [0, 1, 2, 3, 4, 6, 15, 60] {
            let cfg = LeaseConfig {
                namespace: "ns".into(),
                name: "l".into(),
                identity: "me".into(),
                duration: Duration::from_secs(secs),
            };
            assert!(cfg.grace_seconds() >= 1, "{secs}");
            assert!(cfg.grace_seconds() < cfg.seconds(), "{secs}");
        }
    }
}
