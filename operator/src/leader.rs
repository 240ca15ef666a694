//! Leader election with a `coordination.k8s.io/v1` Lease, so several replicas can run
//! and exactly one reconciles. Every Lease write carries the resourceVersion it read,
//! so two candidates can never both believe they took the Lease.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use tracing::{debug, info};

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

/// What one attempt at the Lease found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the Lease.
    Leading,
    /// Another replica holds a valid Lease.
    Following(String),
}

/// Whether the Lease held by someone else has run out at `now`.
pub fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return true;
    };
    let seconds = spec.lease_duration_seconds.unwrap_or(15);
    now.duration_since(renewed.0).as_secs_f64() > f64::from(seconds)
}

/// Tries once to take or renew the Lease.
pub async fn try_acquire(client: &Client, cfg: &LeaseConfig) -> Result<Attempt, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let now = Timestamp::now();
    let seconds = i32::try_from(cfg.duration.as_secs()).unwrap_or(15);
    let fresh_spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(seconds),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(fresh_spec(0, None)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(s)) if s.is_already_exists() => {
                    Ok(Attempt::Following("another replica".into()))
                }
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let mine = holder == cfg.identity;
            if !mine && !holder.is_empty() && !expired(&spec, now) {
                return Ok(Attempt::Following(holder));
            }
            let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
            let acquired = if mine {
                spec.acquire_time.clone()
            } else {
                None
            };
            lease.spec = Some(fresh_spec(transitions, acquired));
            // `replace` sends the resourceVersion we read: a concurrent writer makes it 409.
            match api
                .replace(&lease.name_any(), &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(s)) if s.is_conflict() => {
                    Ok(Attempt::Following("a concurrent candidate".into()))
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// Blocks until this replica leads. `on_change` is told each time the holder changes.
pub async fn acquire(client: &Client, cfg: &LeaseConfig) {
    let retry = cfg.duration / 3;
    let mut last = String::new();
    loop {
        match try_acquire(client, cfg).await {
            Ok(Attempt::Leading) => {
                info!(lease = %cfg.name, identity = %cfg.identity, "became leader");
                return;
            }
            Ok(Attempt::Following(holder)) => {
                if holder != last {
                    info!(%holder, "standing by; another replica leads");
                    last = holder;
                }
            }
            Err(e) => debug!(error = %e, "lease attempt failed"),
        }
        tokio::time::sleep(retry).await;
    }
}

/// Renews the Lease until renewal fails for longer than the Lease lasts; then returns,
/// and the caller must stop reconciling (the process exits and restarts as a follower).
pub async fn hold(client: &Client, cfg: &LeaseConfig) {
    let period = cfg.duration / 3;
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(period).await;
        match try_acquire(client, cfg).await {
            Ok(Attempt::Leading) => last_ok = tokio::time::Instant::now(),
            Ok(Attempt::Following(holder)) => {
                info!(%holder, "lost the lease");
                return;
            }
            Err(e) => {
                debug!(error = %e, "lease renewal failed");
                // Give up before the Lease can expire under another candidate's eyes.
                if last_ok.elapsed() + period >= cfg.duration {
                    info!("could not renew the lease in time");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_follows_renew_time_and_duration() {
        let t = |s| Timestamp::from_second(s).unwrap();
        let spec = LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(t(1000))),
            ..LeaseSpec::default()
        };
        assert!(!expired(&spec, t(1010)));
        assert!(expired(&spec, t(1016)));
        assert!(expired(&LeaseSpec::default(), t(0)));
    }
}
