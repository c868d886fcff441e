//! Which held messages no live worker can be holding (orphans, see `broker::workers`): the
//! poller's side, joining an endpoint's TaskQueues (whose pools consume which queue) with the
//! heartbeats of its subscriptions.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::broker::heartbeat::SharedWorkers;
use crate::broker::reader::Holders;
use crate::broker::workers::Start;

/// A message is not judged before this long after it was first seen, and a worker first heard
/// within this long after a message was seen may have fetched it (a worker fetches before its
/// first heartbeat reaches us; a read sees a message up to one poll after its delivery).
pub const ORPHAN_GRACE: Duration = Duration::from_secs(30);

/// Per (key prefix, queue), the pools (`<nodeName>@<Deployment>`) of the TaskQueues that consume
/// it on one endpoint.
#[derive(Debug, Default)]
pub struct Consumers(HashMap<(String, String), Vec<String>>);

impl Consumers {
    pub fn add(&mut self, prefix: &str, queue: &str, pool: &str) {
        let pools = self.0.entry((prefix.to_string(), queue.to_string())).or_default();
        if !pool.is_empty() && !pools.iter().any(|p| p == pool) {
            pools.push(pool.to_string());
        }
    }
}

/// One read's view: since when each consumed queue has had a live worker that can hold its
/// messages, per key prefix and queue, and the time of the read. Built once per read from the
/// consumers and the heartbeats; a queue missing here is not judged.
pub struct Judge {
    cover: HashMap<String, HashMap<String, Start>>,
    now: Instant,
}

impl Judge {
    /// `workers`: the live workers of each key prefix's subscription on the endpoint.
    pub fn new(consumers: &Consumers, workers: &HashMap<String, SharedWorkers>, now: Instant) -> Self {
        let starts: HashMap<&str, HashMap<String, Start>> =
            workers.iter().map(|(prefix, w)| (prefix.as_str(), w.lock().expect("lock").starts(now))).collect();
        let mut cover: HashMap<String, HashMap<String, Start>> = HashMap::new();
        for ((prefix, queue), pools) in &consumers.0 {
            let Some(starts) = starts.get(prefix.as_str()) else { continue };
            // The earliest among the pools ever heard; none heard: not judged.
            if let Some(earliest) = pools.iter().filter_map(|p| starts.get(p)).min() {
                cover.entry(prefix.clone()).or_default().insert(queue.clone(), *earliest);
            }
        }
        Self { cover, now }
    }
}

impl Holders for Judge {
    /// Held unless every pool of the queue that was ever heard has no live worker from before
    /// the message (pools never heard cannot be judged: their messages count as held).
    fn may_hold(&self, prefix: &str, queue: &str, seen: Instant) -> bool {
        if self.now.saturating_duration_since(seen) < ORPHAN_GRACE {
            return true;
        }
        self.cover.get(prefix).and_then(|q| q.get(queue)).is_none_or(|start| start.covers(seen, ORPHAN_GRACE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::workers::{WorkerEvent, Workers};

    #[test]
    fn a_queue_is_judged_by_the_pools_heard_among_its_consumers() {
        let s = Duration::from_secs;
        let t0 = Instant::now();
        let mut consumers = Consumers::default();
        consumers.add("", "q", "q@q");
        consumers.add("", "q", "x@x"); // never heard (say, its heartbeats are off)
        consumers.add("", "q", "q@q");
        let mut w = Workers::default();
        w.listening(t0);
        let beat = |h: &str, online| WorkerEvent::Alive {
            hostname: h.into(),
            active: 0,
            freq: s(2),
            pid: Some(1),
            online,
            processed: None,
        };
        w.apply(beat("q@q-abc-11111", true), t0 + s(100));
        let workers = HashMap::from([(String::new(), SharedWorkers::new(w.into()))]);
        let judge = Judge::new(&consumers, &workers, t0 + s(101));
        assert!(!judge.may_hold("", "q", t0), "seen 101 s before the only live worker started");
        assert!(judge.may_hold("", "q", t0 + s(90)), "within the grace of a live worker's start");
        assert!(judge.may_hold("", "other", t0), "a queue nobody here consumes is not judged");
        assert!(judge.may_hold("pfx", "q", t0), "no subscription for the prefix: cannot tell");
        assert!(Judge::new(&consumers, &workers, t0 + s(10)).may_hold("", "q", t0), "not judged within the grace");
    }
}
