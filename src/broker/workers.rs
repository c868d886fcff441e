//! The live workers of one broker, as their heartbeats say (reference §7), and whether a held
//! message still has a worker that can be holding it.
//!
//! Like Celery's own `events.State`, a worker is gone once two heartbeats are missed. For each
//! live worker this also keeps *since when* it has been alive, because kombu's `unacked` does
//! not say which worker holds a message: a message delivered before every live worker of its
//! pools started was fetched by a worker that is gone (SIGKILL, OOM, a lost node). Such an entry
//! is an *orphan*: it stays in `unacked` until a worker restores it after the transport's
//! `visibility_timeout` (1 h by default), and counting it as held work would keep idle replicas
//! up all that time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One decoded worker event.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkerEvent {
    /// `worker-online` or `worker-heartbeat`.
    Alive {
        hostname: String,
        active: i64,
        freq: Duration,
        /// The worker process: a new pid under the same hostname (a container restarted in its
        /// pod) is a new worker.
        pid: Option<i64>,
        /// `worker-online`: the worker has just started.
        online: bool,
        /// Tasks the worker received since it started (for `throughput`).
        processed: Option<i64>,
    },
    Offline {
        hostname: String,
    },
}

#[derive(Clone, Copy, Debug)]
struct Beat {
    at: Instant,
    freq: Duration,
    active: i64,
    pid: Option<i64>,
    /// When this worker was first heard; None: it was already there when listening began.
    since: Option<Instant>,
}

/// Pools heard are remembered up to this many (anyone who may PUBLISH can invent hostnames).
const MAX_POOLS_HEARD: usize = 10_000;

/// Live workers of one broker, by hostname.
#[derive(Debug, Default)]
pub struct Workers {
    beats: HashMap<String, Beat>,
    /// When the current subscription began (None: not yet).
    listening: Option<Instant>,
    /// The pools (`<nodeName>@<Deployment>`, see [`pool_of`]) any worker was ever heard from:
    /// a pool never heard cannot be judged (its workers may not send heartbeats).
    heard: HashSet<String>,
}

impl Workers {
    /// A (new) subscription began at `now`: workers first heard within two heartbeats of it
    /// may have been running for any time.
    pub fn listening(&mut self, now: Instant) {
        self.listening = Some(now);
    }

    pub fn apply(&mut self, event: WorkerEvent, now: Instant) {
        match event {
            WorkerEvent::Alive { hostname, active, freq, pid, online, .. } => {
                let early = self.listening.is_none_or(|l| now.saturating_duration_since(l) <= freq * 2);
                let since = match self.beats.get(&hostname) {
                    _ if online => Some(now),
                    Some(b) if alive(b, now) && b.pid == pid => b.since,
                    _ if early => None,
                    _ => Some(now),
                };
                if let Some(pool) = pool_of(&hostname) {
                    if self.heard.len() < MAX_POOLS_HEARD {
                        self.heard.insert(pool);
                    }
                }
                self.beats.insert(hostname, Beat { at: now, freq, active, pid, since });
            }
            WorkerEvent::Offline { hostname } => {
                self.beats.remove(&hostname);
            }
        }
        // Keep the map bounded by the live workers.
        self.beats.retain(|_, b| alive(b, now));
    }

    /// Running tasks of a live worker; None when it is unknown or missed two heartbeats.
    pub fn active(&self, hostname: &str, now: Instant) -> Option<i64> {
        self.beats.get(hostname).filter(|b| alive(b, now)).map(|b| b.active)
    }

    /// Live workers of `pool` (see [`pool_of`]) at `now`, once this subscription has listened
    /// for `settle` (None before: a worker may not have beaten yet).
    pub fn live_in_pool(&self, pool: &str, now: Instant, settle: Duration) -> Option<usize> {
        self.listening
            .filter(|l| now.saturating_duration_since(*l) >= settle)
            .map(|_| self.beats.iter().filter(|(h, b)| alive(b, now) && pool_of(h).as_deref() == Some(pool)).count())
    }

    /// Workers alive at `now`.
    pub fn live(&self, now: Instant) -> usize {
        self.beats.values().filter(|b| alive(b, now)).count()
    }

    pub fn len(&self) -> usize {
        self.beats.len()
    }

    pub fn is_empty(&self) -> bool {
        self.beats.is_empty()
    }

    /// For each pool ever heard (see [`pool_of`]), since when it has had a live worker at `now`:
    /// its earliest-started live worker. A pool missing here was never heard: it cannot be told.
    /// One pass over the workers, for a whole read (not one per held message).
    pub fn starts(&self, now: Instant) -> HashMap<String, Start> {
        let mut out: HashMap<String, Start> = self.heard.iter().map(|p| (p.clone(), Start::Nobody)).collect();
        for (host, b) in self.beats.iter().filter(|(_, b)| alive(b, now)) {
            let start = b.since.map_or(Start::Always, Start::At);
            if let Some(earliest) = pool_of(host).and_then(|p| out.get_mut(&p)) {
                *earliest = (*earliest).min(start);
            }
        }
        out
    }
}

/// Since when a pool has had a live worker; ordered earliest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Start {
    /// One was already running when the subscription began.
    Always,
    At(Instant),
    /// No live worker.
    Nobody,
}

impl Start {
    /// Whether a worker alive since then can be holding a message first seen at `seen`: it was
    /// alive before `seen + grace` (a worker fetches before its first heartbeat is heard).
    pub fn covers(self, seen: Instant, grace: Duration) -> bool {
        match self {
            Start::Always => true,
            Start::At(t) => t <= seen + grace,
            Start::Nobody => false,
        }
    }
}

fn alive(b: &Beat, now: Instant) -> bool {
    now.saturating_duration_since(b.at) <= b.freq * 2
}

/// The pool of a worker of ours: its hostname is `<nodeName>@<pod>` (the worker command's
/// `-n <nodeName>@%h`), and a Deployment's pod is `<Deployment>-<template hash>-<suffix>`; the
/// pool is `<nodeName>@<Deployment>`. None for a hostname of another shape.
pub fn pool_of(hostname: &str) -> Option<String> {
    let (node, pod) = hostname.split_once('@')?;
    let mut parts = pod.rsplitn(3, '-');
    let (_suffix, _hash, deployment) = (parts.next()?, parts.next()?, parts.next()?);
    (!node.is_empty() && !deployment.is_empty()).then(|| format!("{node}@{deployment}"))
}

/// The pool name of a TaskQueue's workers (see [`pool_of`]).
pub fn pool_name(node_name: &str, deployment: &str) -> String {
    format!("{node_name}@{deployment}")
}

pub type SharedWorkers = Arc<Mutex<Workers>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(h: &str, active: i64) -> WorkerEvent {
        event(h, active, 1, false)
    }

    fn event(h: &str, active: i64, pid: i64, online: bool) -> WorkerEvent {
        WorkerEvent::Alive {
            hostname: h.into(),
            active,
            freq: Duration::from_secs(2),
            pid: Some(pid),
            online,
            processed: None,
        }
    }

    #[test]
    fn a_worker_is_gone_after_two_missed_heartbeats_or_offline() {
        let t0 = Instant::now();
        let mut w = Workers::default();
        w.apply(beat("a@p1", 0), t0);
        w.apply(beat("b@p2", 2), t0);
        assert_eq!(w.active("a@p1", t0 + Duration::from_secs(4)), Some(0));
        assert_eq!(w.active("b@p2", t0 + Duration::from_secs(4)), Some(2));
        assert_eq!(w.active("a@p1", t0 + Duration::from_millis(4001)), None, "two heartbeats missed");
        w.apply(WorkerEvent::Offline { hostname: "b@p2".into() }, t0 + Duration::from_secs(1));
        assert_eq!(w.active("b@p2", t0 + Duration::from_secs(1)), None);
        w.apply(beat("c@p3", 1), t0 + Duration::from_secs(10));
        assert_eq!(w.len(), 1, "expired workers are dropped");
    }

    #[test]
    fn pools_are_node_name_and_deployment() {
        assert_eq!(pool_of("general@general-7d9f8b6c5d-x2k4q").as_deref(), Some("general@general"));
        assert_eq!(pool_of("w@my-pool-7d9f8b6c5d-x2k4q").as_deref(), Some("w@my-pool"));
        assert_eq!(pool_of("w@laptop"), None);
        assert_eq!(pool_of("w@a-b"), None);
        assert_eq!(pool_of("no-at-sign-x-y"), None);
        assert_eq!(pool_name("w", "my-pool"), "w@my-pool");
    }

    /// Whether a live worker of `pool` can be holding a message first seen at `seen` (None: the
    /// pool was never heard).
    fn may_hold(w: &Workers, pool: &str, seen: Instant, grace: Duration, now: Instant) -> Option<bool> {
        w.starts(now).get(pool).map(|start| start.covers(seen, grace))
    }

    #[test]
    fn a_message_from_before_every_live_worker_of_its_pool_is_held_by_nobody() {
        let s = Duration::from_secs;
        let grace = s(30);
        let t0 = Instant::now();
        let mut w = Workers::default();
        w.listening(t0);
        // Heard in the first heartbeats: running for who knows how long, holds anything.
        w.apply(beat("q@q-abc-11111", 0), t0 + s(1));
        let pool = "q@q";
        assert_eq!(may_hold(&w, pool, t0, grace, t0 + s(2)), Some(true));
        assert_eq!(may_hold(&w, "other@other", t0, grace, t0 + s(2)), None, "never heard: cannot tell");
        // It is killed (no offline); its messages were seen at t0. A new pod starts at t0 + 100 s.
        let start = t0 + s(100);
        w.apply(event("q@q-abc-22222", 0, 1, true), start);
        assert_eq!(may_hold(&w, pool, t0, grace, start + s(1)), Some(false), "the old messages are orphans");
        assert_eq!(may_hold(&w, pool, start - s(28), grace, start + s(1)), Some(true), "fetched around its start");
        // The same hostname with a new pid (its container restarted) is a new worker.
        w.apply(beat("q@q-abc-22222", 0), start + s(2));
        w.apply(event("q@q-abc-22222", 0, 2, false), start + s(3));
        assert_eq!(may_hold(&w, pool, start - s(28), grace, start + s(4)), Some(false));
        // Once its pool has no live worker at all, nothing of it is held.
        assert_eq!(may_hold(&w, pool, start + s(100), grace, start + s(60)), Some(false));
    }
}
