//! metav1.Condition bookkeeping (pure).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const SPEC_VALID: &str = "SpecValid";
pub const BROKER_REACHABLE: &str = "BrokerReachable";
pub const DEPLOYMENT_OWNED: &str = "DeploymentOwned";
pub const ROUTES_ACCEPTED: &str = "RoutesAccepted";
pub const SCALING_LIMITED: &str = "ScalingLimited";
pub const PAUSED: &str = "Paused";
pub const QUEUE_SHARED: &str = "QueueShared";
pub const WORKERS_HEARD: &str = "WorkersHeard";
pub const WORKER_MATCHES: &str = "WorkerMatches";
/// True when other installations of the operator also watch the TaskQueue (`installations.rs`).
pub const INSTALLATION_CONFLICT: &str = "InstallationConflict";
/// Whether kombu's bindings of the pool's queues use the spec's `sep` (see `plan::separator`).
pub const KEYS_MATCH: &str = "KeysMatch";

/// Condition messages are cut to this many bytes: a spec with hundreds of conflicting routes
/// would otherwise make a status too large to read (or to store).
pub const MAX_MESSAGE: usize = 4096;

/// Builds the new condition list; a condition whose status did not change keeps its
/// `lastTransitionTime`, so an unchanged world produces an identical status (and no write).
pub struct Conditions<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    now: Time,
    pub list: Vec<Condition>,
}

impl<'a> Conditions<'a> {
    pub fn new(previous: &'a [Condition], generation: Option<i64>, now: Time) -> Self {
        Self { previous, generation, now, list: Vec::new() }
    }

    pub fn set(&mut self, type_: &str, status: bool, reason: &str, message: impl Into<String>) {
        self.set_raw(type_, if status { "True" } else { "False" }, reason, message.into());
    }

    pub fn unknown(&mut self, type_: &str, reason: &str, message: impl Into<String>) {
        self.set_raw(type_, "Unknown", reason, message.into());
    }

    /// Keep the previous value of every condition not set this time (a step that did not run
    /// says nothing new about its condition).
    pub fn keep_previous(&mut self) {
        for c in self.previous {
            if self.list.iter().all(|n| n.type_ != c.type_) {
                self.list.push(c.clone());
            }
        }
    }

    /// The condition `type_` as it was before this reconcile.
    pub fn previous(&self, type_: &str) -> Option<&Condition> {
        find(self.previous, type_)
    }

    /// Keep the previous value of condition `type_` (nothing new was learnt about it).
    pub fn keep(&mut self, type_: &str) {
        if let Some(c) = find(self.previous, type_).filter(|_| find(&self.list, type_).is_none()) {
            self.list.push(c.clone());
        }
    }

    pub fn is(&self, type_: &str, status: &str) -> bool {
        find(&self.list, type_).is_some_and(|c| c.status == status)
    }

    fn set_raw(&mut self, type_: &str, status: &str, reason: &str, message: String) {
        let old = find(self.previous, type_);
        let last_transition_time = match old {
            Some(o) if o.status == status => o.last_transition_time.clone(),
            _ => self.now.clone(),
        };
        self.list.retain(|c| c.type_ != type_);
        self.list.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: super::events::truncate(&message, MAX_MESSAGE).into_owned(),
            observed_generation: self.generation,
            last_transition_time,
        });
    }

    /// True when `type_` is False now and was not False before (or said something else):
    /// the moment to emit one warning Event, not one per tick.
    pub fn turned_false(&self, type_: &str) -> bool {
        let new = find(&self.list, type_);
        let old = find(self.previous, type_);
        matches!(new, Some(n) if n.status == "False" && old.is_none_or(|o| o.status != "False" || o.reason != n.reason || o.message != n.message))
    }
}

pub fn find<'c>(list: &'c [Condition], type_: &str) -> Option<&'c Condition> {
    list.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Time {
        Time(jiff::Timestamp::from_second(s).unwrap())
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut c = Conditions::new(&[], Some(1), t(100));
        c.set(BROKER_REACHABLE, true, "Read", "ok");
        let first = c.list.clone();
        let mut c = Conditions::new(&first, Some(1), t(200));
        c.set(BROKER_REACHABLE, true, "Read", "ok, different words");
        assert_eq!(c.list[0].last_transition_time, t(100));
        assert!(!c.turned_false(BROKER_REACHABLE));
        let second = c.list.clone();
        let mut c = Conditions::new(&second, Some(1), t(300));
        c.set(BROKER_REACHABLE, false, "BrokerUnreachable", "connection refused");
        assert_eq!(c.list[0].last_transition_time, t(300));
        assert!(c.turned_false(BROKER_REACHABLE));
        let third = c.list.clone();
        let mut c = Conditions::new(&third, Some(1), t(400));
        c.set(BROKER_REACHABLE, false, "BrokerUnreachable", "connection refused");
        assert!(!c.turned_false(BROKER_REACHABLE), "same failure again is not a new event");
    }
}
