//! Leader election on a `coordination.k8s.io/v1` Lease, so that several replicas can run and only
//! one of them writes.
//!
//! The holder renews the Lease every `retry_period`. A standby takes it over once it has seen
//! the same record, unchanged, for `lease_duration` by its own clock. It never compares its
//! clock with the holder's timestamps, so clock skew between nodes does not matter. Every
//! update is guarded by the `resourceVersion` it read, so two standbys cannot both win.
//!
//! A leader that cannot renew for `renew_deadline` steps down: it stops writing before any
//! standby can take over. Timeline, from the last renewal the others saw at T:
//! - the leader stops by T + renew_deadline + one attempt's deadline (T + 12 s with the
//!   defaults);
//! - a standby takes over at T + lease_duration at the earliest (T + 15 s).
//!
//! On a clean shutdown the leader releases the Lease (empty holder), so a standby takes over at
//! its next try instead of waiting for the Lease to expire.

use std::sync::{Arc, RwLock};
use std::time::Duration;

// Tokio's clock: the same as the system's in production, and one a test can pause and advance,
// so the election's timing is checked by its logic, not by how fast the machine is.
use tokio::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

/// The Lease of `run` without `--lease-name`.
pub const DEFAULT_LEASE: &str = "taskqueue-operator";

/// Where and how to hold the Lease.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This process (the pod name, unique per replica).
    pub identity: String,
    /// How long a standby waits, after the last change it saw, before taking over.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// Time between attempts; also the deadline of each attempt.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s between attempts.
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self::named(namespace, DEFAULT_LEASE, identity)
    }

    /// As [`LeaseConfig::new`], on the Lease `name`: one per installation, so two releases in one
    /// namespace each elect their own leader.
    pub fn named(namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a standby knows of someone else's Lease: the record it last saw, and since when (by
/// its own clock) it has seen it unchanged.
#[derive(Default)]
struct Observer {
    last: Option<(Record, Instant)>,
}

/// (holder, renewTime, resourceVersion): any renewal changes it.
type Record = (Option<String>, Option<MicroTime>, Option<String>);

impl Observer {
    /// Whether the holder has let the Lease lapse: its record (holder, renewTime,
    /// resourceVersion) has not changed for its lease duration.
    fn expired(&mut self, lease: &Lease, default: Duration, now: Instant) -> bool {
        let spec = lease.spec.as_ref();
        let record = (
            spec.and_then(|s| s.holder_identity.clone()),
            spec.and_then(|s| s.renew_time.clone()),
            lease.metadata.resource_version.clone(),
        );
        let duration = spec
            .and_then(|s| s.lease_duration_seconds)
            .map_or(default, |s| Duration::from_secs(u64::try_from(s).unwrap_or(0)));
        match &self.last {
            Some((seen, since)) if *seen == record => now.saturating_duration_since(*since) >= duration,
            _ => {
                self.last = Some((record, now));
                false
            }
        }
    }
}

pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    observer: Observer,
    /// The Lease's holder at the last attempt (for the dashboard of a standby).
    pub holder: Arc<RwLock<Option<String>>>,
}

impl Elector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observer: Observer::default(),
            holder: Arc::default(),
        }
    }

    /// One attempt: renew the Lease we hold, or take it when it is free or expired. True when
    /// we hold it afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(jiff::Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            return self.create(now).await;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.cfg.identity.as_str());
        if !mine && holder.is_some() && !self.observer.expired(&lease, self.cfg.lease_duration, Instant::now()) {
            *self.holder.write().expect("lock") = holder;
            return Ok(false);
        }
        let taking_over = !mine;
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(seconds(self.cfg.lease_duration)),
            acquire_time: if taking_over { Some(now.clone()) } else { spec.acquire_time },
            renew_time: Some(now),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(taking_over)),
            ..spec
        });
        // Guarded by the resourceVersion we read: a concurrent update wins, we lose (409).
        match self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => {
                if taking_over {
                    info!(lease = %self.cfg.name, previous = holder.as_deref().unwrap_or("<none>"), "took the lease");
                }
                *self.holder.write().expect("lock") = Some(self.cfg.identity.clone());
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn create(&self, now: MicroTime) -> Result<bool, kube::Error> {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(self.cfg.name.clone()), ..ObjectMeta::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.cfg.identity.clone()),
                lease_duration_seconds: Some(seconds(self.cfg.lease_duration)),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(_) => {
                info!(lease = %self.cfg.name, "created and took the lease");
                *self.holder.write().expect("lock") = Some(self.cfg.identity.clone());
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the Lease up (clean shutdown): a standby takes it at its next attempt.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else { return };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => info!(lease = %self.cfg.name, "released the lease"),
            Err(e) => warn!(lease = %self.cfg.name, error = %e, "could not release the lease; it expires on its own"),
        }
    }
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX).max(1)
}

/// Keep trying, renewing while leading; publish whether we lead on `leading`. Runs until the
/// receivers are gone.
pub async fn run(mut elector: Elector, leading: watch::Sender<bool>) {
    let cfg = elector.cfg.clone();
    let mut last_renewal: Option<Instant> = None;
    while !leading.is_closed() {
        let attempt = tokio::time::timeout(cfg.retry_period, elector.try_acquire_or_renew()).await;
        let held = match attempt {
            Ok(Ok(held)) => Some(held),
            Ok(Err(e)) => {
                warn!(lease = %cfg.name, error = %e, "lease attempt failed");
                None
            }
            Err(_) => {
                warn!(lease = %cfg.name, "lease attempt timed out after {:?}", cfg.retry_period);
                None
            }
        };
        match held {
            Some(true) => last_renewal = Some(Instant::now()),
            Some(false) => last_renewal = None,
            // Unknown: keep leading until the renew deadline, then step down.
            None => {
                if last_renewal.is_some_and(|t| t.elapsed() >= cfg.renew_deadline) {
                    warn!(lease = %cfg.name, "no renewal for {:?}: stepping down", cfg.renew_deadline);
                    last_renewal = None;
                }
            }
        }
        let now_leading = last_renewal.is_some();
        if *leading.borrow() != now_leading {
            info!(lease = %cfg.name, identity = %cfg.identity, "{}", if now_leading { "leading" } else { "standing by" });
            leading.send_replace(now_leading);
        }
        // A leader whose renewals fail looks again at its deadline, not after it.
        let wait = match (held, last_renewal) {
            (None, Some(t)) => cfg.retry_period.min(cfg.renew_deadline.saturating_sub(t.elapsed())),
            _ => cfg.retry_period,
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, version: &str, seconds: i32) -> Lease {
        Lease {
            metadata: ObjectMeta { resource_version: Some(version.into()), ..ObjectMeta::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(seconds),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn a_lease_expires_after_its_duration_unchanged_by_our_own_clock() {
        let (t0, s) = (Instant::now(), Duration::from_secs);
        let mut o = Observer::default();
        assert!(!o.expired(&lease("a", "1", 15), s(15), t0), "first sight starts the clock");
        assert!(!o.expired(&lease("a", "1", 15), s(15), t0 + s(14)));
        // A renewal (new resourceVersion) starts it again.
        assert!(!o.expired(&lease("a", "2", 15), s(15), t0 + s(14)));
        assert!(!o.expired(&lease("a", "2", 15), s(15), t0 + s(28)));
        assert!(o.expired(&lease("a", "2", 15), s(15), t0 + s(29)));
        // The holder's own duration counts, not ours.
        let mut o = Observer::default();
        o.expired(&lease("b", "7", 60), s(15), t0);
        assert!(!o.expired(&lease("b", "7", 60), s(15), t0 + s(59)));
        assert!(o.expired(&lease("b", "7", 60), s(15), t0 + s(60)));
    }
}
