//! What this operator did and announced per TaskQueue, kept between reconciles. Watch caches lag
//! behind our own writes and a stored status can be older than our last decision; this memory
//! keeps the process from repeating a write, a scale step or an event. It is plain data: the
//! pure `plan` reads a copy and returns the next one.

use std::collections::BTreeMap;
use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::scaling::History;

#[derive(Clone, Debug, Default)]
pub struct Memory {
    /// Scaling recommendations within the stabilization window (bounded, see `History`).
    pub history: History,
    /// Our last successful Deployment write.
    pub applied: Option<Applied>,
    /// The last replica change (time, reason), for status.
    pub last_scale: Option<(Time, String)>,
    /// Problems already announced by a Warning Event (condition type -> what was announced).
    pub warned: BTreeMap<&'static str, String>,
    /// Since when the broker could not be read (for `fallbackAfter`).
    pub unknown_since: Option<Instant>,
    /// The queue sharing last announced by an Event (the `QueueShared` message).
    pub shared: Option<String>,
    /// Whether the pause was last announced as on (None: nothing announced by this process).
    pub paused: Option<bool>,
    /// The API server refused this Deployment template; held until it changes or is retried.
    pub rejected: Option<Rejected>,
    /// Our last status write.
    pub status_write: Option<StatusWrite>,
    /// Since when the pool has had Ready pods (for `WorkersHeard`).
    pub ready_since: Option<Instant>,
    /// Other installations last seen writing this TaskQueue, and when (see `installations`):
    /// a write of ours takes their fields over, so their entries do not stay to be seen.
    pub others: Option<(Vec<crate::controller::installations::Other>, Instant)>,
}

/// A status write: a hash of what it said, and when. The watch cache shows our own write a
/// little later: until it does, the cached object still has the status from before, and the
/// same status must not be written again (each new TaskQueue was written up to four times).
/// Only this operator writes the status; a write older than `STATUS_CACHE_LAG` is no longer
/// trusted over the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusWrite {
    pub hash: u64,
    pub at: Instant,
}

/// How long the watch cache may lag behind our own status write.
pub const STATUS_CACHE_LAG: std::time::Duration = std::time::Duration::from_secs(10);
/// A Deployment write the API server accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// `metadata.generation` in the server's answer: a cached copy older than this is stale.
    pub generation: i64,
    /// `deployment::fingerprint` of what was written (replicas included).
    pub fingerprint: u64,
    pub replicas: i32,
}

/// A Deployment write the API server refused (HTTP 4xx): the template, its message, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// `deployment::template_fingerprint` of the refused Deployment.
    pub template: u64,
    pub message: String,
    pub at: Instant,
}
