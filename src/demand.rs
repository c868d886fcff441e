//! What counts as demand (pure): tasks held for a later ETA, and queues several pools share.
//!
//! - **ETA / countdown.** A worker fetches such a task at once and holds it unacknowledged
//!   until it is due. An `unacked` entry whose ETA lies beyond `etaHorizon` is *scheduled*: it
//!   adds no replicas (it still keeps one worker, see `scaling`). Within the horizon it is in
//!   flight like any other, so capacity is there when it is due.
//! - **Shared queues.** A queue consumed by several TaskQueues of one namespace and broker has
//!   its demand counted once, split between its *owners*: the TaskQueues whose `spec.queue` it
//!   is, or, when it is no one's `spec.queue`, every TaskQueue that lists it in `extraQueues`.
//!   Owners split it by capacity (`maxReplicas × tasksPerReplica`) in whole messages (largest
//!   remainder, ties to the name first in order), so the parts add up to the queue exactly. A
//!   TaskQueue that only lists the queue in `extraQueues` while another owns it counts none of
//!   it: its workers still take from the queue, as extra capacity.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::broker::QueueDepth;
use crate::scaling::Load;

/// One TaskQueue consuming a queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumer {
    pub name: String,
    /// The queue is this TaskQueue's `spec.queue` (not one of its `extraQueues`).
    pub primary: bool,
    /// Capacity: `maxReplicas × tasksPerReplica`.
    pub weight: i64,
}

/// Everyone consuming one queue (one namespace, broker and key prefix), ordered by name, and
/// which of them this share is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    pub consumers: Vec<Consumer>,
    pub me: usize,
}

impl Share {
    /// A queue nobody else consumes.
    pub fn alone(me: Consumer) -> Self {
        Self { consumers: vec![me], me: 0 }
    }

    /// The share of `me` among `consumers` (any order; `me` must be among them).
    pub fn among(mut consumers: Vec<Consumer>, me: &str) -> Self {
        consumers.sort_by(|a, b| a.name.cmp(&b.name));
        match consumers.iter().position(|c| c.name == me) {
            Some(me) => Self { consumers, me },
            None => Self::alone(Consumer { name: me.to_string(), primary: true, weight: 0 }),
        }
    }

    pub fn is_shared(&self) -> bool {
        self.consumers.len() > 1
    }

    /// Whether consumer `i` owns (a part of) the queue's demand.
    fn owns(&self, i: usize) -> bool {
        let any_primary = self.consumers.iter().any(|c| c.primary);
        !any_primary || self.consumers[i].primary
    }

    /// What each consumer's part is proportional to: an owner's capacity (or 1 each when no
    /// owner has any, so owners split evenly), 0 for the others.
    fn weights(&self) -> Vec<i64> {
        let capacity = |i: usize| if self.owns(i) { self.consumers[i].weight.max(0) } else { 0 };
        let mut w: Vec<i64> = (0..self.consumers.len()).map(capacity).collect();
        if w.iter().all(|x| *x == 0) {
            w = (0..self.consumers.len()).map(|i| i64::from(self.owns(i))).collect();
        }
        w
    }

    /// This TaskQueue's part of `n` messages of the queue.
    pub fn part(&self, n: i64) -> i64 {
        if !self.is_shared() {
            return n.max(0);
        }
        apportion(n, &self.weights())[self.me]
    }

    /// The weight of `me` and the owners' total: the fraction of the demand this pool counts.
    pub fn fraction(&self) -> (i64, i64) {
        let w = self.weights();
        (w[self.me], w.iter().fold(0i64, |a, x| a.saturating_add(*x)))
    }

    /// The other consumers, for the condition: `b (spec.queue), c (extraQueues)`.
    pub fn others(&self) -> String {
        let names: Vec<String> = self
            .consumers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.me)
            .map(|(_, c)| format!("{} ({})", c.name, if c.primary { "spec.queue" } else { "extraQueues" }))
            .collect();
        names.join(", ")
    }

    /// How this pool counts the queue, in words (no message counts: stable while specs are).
    pub fn policy(&self) -> String {
        if !self.owns(self.me) {
            let owners: Vec<&str> = self
                .consumers
                .iter()
                .enumerate()
                .filter(|(i, _)| self.owns(*i))
                .map(|(_, c)| c.name.as_str())
                .collect();
            return format!(
                "counted by {} (its spec.queue), not here: this pool's workers take from it as extra capacity",
                owners.join(", ")
            );
        }
        let (mine, total) = self.fraction();
        format!("this pool counts {mine}/{total} of its demand (split by maxReplicas × tasksPerReplica)")
    }
}

/// Split `n` (≥ 0) into whole parts proportional to `weights` (≥ 0): largest remainder, ties
/// to the lower index. Parts add up to `n` exactly whenever some weight is positive.
pub fn apportion(n: i64, weights: &[i64]) -> Vec<i64> {
    let n = i128::from(n.max(0));
    let w: Vec<i128> = weights.iter().map(|x| i128::from((*x).max(0))).collect();
    let total: i128 = w.iter().sum();
    if total == 0 {
        return vec![0; weights.len()];
    }
    let mut parts: Vec<i128> = w.iter().map(|x| n * x / total).collect();
    let mut leftover = n - parts.iter().sum::<i128>();
    let mut order: Vec<usize> = (0..w.len()).filter(|i| w[*i] > 0).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(n * w[i] % total), i));
    for i in order {
        if leftover == 0 {
            break;
        }
        parts[i] += 1;
        leftover -= 1;
    }
    parts.into_iter().map(|p| i64::try_from(p).unwrap_or(i64::MAX)).collect()
}

/// One queue of a TaskQueue as read from the broker, with its share.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueReading {
    pub queue: String,
    pub depth: QueueDepth,
    pub share: Share,
}

/// In-flight entries of one queue, split at `now + horizon`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Due within the horizon, or without an ETA: demand.
    pub due: i64,
    /// ETA beyond the horizon: held for later, not demand.
    pub scheduled: i64,
    /// Milliseconds until the earliest scheduled entry comes within the horizon.
    pub next_due_ms: Option<i64>,
}

/// Split a queue's in-flight entries at `now_ms + horizon`.
pub fn classify(depth: &QueueDepth, now_ms: i64, horizon: Duration) -> InFlight {
    let edge = now_ms.saturating_add(i64::try_from(horizon.as_millis()).unwrap_or(i64::MAX));
    // `etas` is ascending: the scheduled ones are the tail beyond the edge.
    let first_later = depth.etas.partition_point(|eta| *eta <= edge);
    let scheduled = i64::try_from(depth.etas.len() - first_later).unwrap_or(i64::MAX).min(depth.in_flight.max(0));
    InFlight {
        due: depth.in_flight.max(0) - scheduled,
        scheduled,
        next_due_ms: depth.etas.get(first_later).map(|eta| eta - edge),
    }
}

/// A TaskQueue's demand over all its queues.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// This pool's part: pending, in flight (due), scheduled.
    pub load: Load,
    /// What each queue holds (whole queues, not parts).
    pub pending_by_queue: BTreeMap<String, i64>,
    /// When a scheduled entry next comes within the horizon: decide again then.
    pub next_due: Option<Duration>,
    /// For the scale reason, when a queue is shared: which part of what this pool counts.
    pub shared_note: Option<String>,
}

/// Sum this pool's parts of its queues at `now_ms`.
pub fn demand(queues: &[QueueReading], now_ms: i64, horizon: Duration) -> Demand {
    let mut out = Demand::default();
    let mut notes = Vec::new();
    for q in queues {
        let f = classify(&q.depth, now_ms, horizon);
        let (pending, due, scheduled) = (q.share.part(q.depth.pending), q.share.part(f.due), q.share.part(f.scheduled));
        out.load.pending = out.load.pending.saturating_add(pending);
        out.load.in_flight = out.load.in_flight.saturating_add(due);
        out.load.scheduled = out.load.scheduled.saturating_add(scheduled);
        out.load.orphaned = out.load.orphaned.saturating_add(q.share.part(q.depth.orphaned));
        out.pending_by_queue.insert(q.queue.clone(), q.depth.pending);
        if let Some(ms) = f.next_due_ms {
            let d = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
            out.next_due = Some(out.next_due.map_or(d, |n| n.min(d)));
        }
        if q.share.is_shared() {
            let (mine, total) = q.share.fraction();
            notes.push(format!(
                "queue {} shared with {}: counts {pending} of {} pending and {due} of {} in flight (share {mine}/{total})",
                q.queue,
                q.share.others(),
                q.depth.pending,
                f.due
            ));
        }
    }
    out.shared_note = (!notes.is_empty()).then(|| notes.join("; "));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumer(name: &str, primary: bool, weight: i64) -> Consumer {
        Consumer { name: name.into(), primary, weight }
    }

    fn depth(pending: i64, in_flight: i64, etas: Vec<i64>) -> QueueDepth {
        QueueDepth { pending, in_flight, etas, ..QueueDepth::default() }
    }

    #[test]
    fn eta_entries_beyond_the_horizon_are_scheduled() {
        let h = Duration::from_secs(30);
        let now = 1_000_000;
        // 5 unacked: 2 without an ETA, one due already, one within the horizon, one beyond it.
        let d = depth(0, 5, vec![now - 1_000, now + 29_000, now + 3_600_000]);
        let f = classify(&d, now, h);
        assert_eq!(f, InFlight { due: 4, scheduled: 1, next_due_ms: Some(3_600_000 - 30_000) });
        // One second before it crosses the horizon, and at the crossing.
        assert_eq!(classify(&d, now + 3_569_000, h).scheduled, 1);
        assert_eq!(classify(&d, now + 3_570_000, h), InFlight { due: 5, scheduled: 0, next_due_ms: None });
        // A zero horizon: everything in the future is scheduled.
        assert_eq!(classify(&d, now, Duration::ZERO).scheduled, 2);
        // More ETAs than entries (a torn read) never makes `due` negative.
        assert_eq!(
            classify(&depth(0, 1, vec![now + 99_999_999; 3]), now, h),
            InFlight { due: 0, scheduled: 1, next_due_ms: Some(99_999_999 - 30_000) }
        );
    }

    /// Random ETAs and clocks: every entry is either due or scheduled, time only moves entries
    /// from scheduled to due, and at `next_due` one of them does.
    #[test]
    fn time_only_turns_scheduled_into_due() {
        let mut rnd = crate::xorshift(0x853C_49E6_748F_EA9B);
        for _ in 0..5_000 {
            let mut etas: Vec<i64> = (0..rnd(20)).map(|_| rnd(100_000)).collect();
            etas.sort_unstable();
            let in_flight = etas.len() as i64 + rnd(5);
            let d = depth(0, in_flight, etas);
            let h = Duration::from_millis(rnd(20_000) as u64);
            let mut now = rnd(50_000);
            let mut last = classify(&d, now, h);
            for _ in 0..10 {
                assert_eq!(last.due + last.scheduled, in_flight);
                let Some(wait) = last.next_due_ms else {
                    assert_eq!(last.scheduled, 0, "nothing scheduled, nothing to wait for");
                    break;
                };
                assert!(wait > 0);
                let before = classify(&d, now + wait - 1, h);
                assert_eq!(before.scheduled, last.scheduled, "nothing comes due early");
                now += wait;
                let next = classify(&d, now, h);
                assert!(next.scheduled < last.scheduled, "at next_due at least one comes within the horizon");
                last = next;
            }
        }
    }

    #[test]
    fn a_queue_alone_is_counted_whole() {
        let q = QueueReading {
            queue: "q".into(),
            depth: depth(7, 3, vec![5_000_000]),
            share: Share::alone(consumer("a", true, 40)),
        };
        let d = demand(&[q], 0, Duration::from_secs(30));
        assert_eq!(d.load, Load { pending: 7, in_flight: 2, scheduled: 1, orphaned: 0 });
        assert_eq!(d.shared_note, None);
        assert_eq!(d.next_due, Some(Duration::from_millis(5_000_000 - 30_000)));
    }

    #[test]
    fn two_pools_on_one_queue_split_it_by_capacity() {
        let both = vec![consumer("big", true, 30), consumer("small", true, 10)];
        let big = Share::among(both.clone(), "big");
        let small = Share::among(both, "small");
        assert_eq!((big.part(8), small.part(8)), (6, 2));
        assert_eq!((big.part(1), small.part(1)), (1, 0), "whole messages, largest remainder");
        assert_eq!(big.fraction(), (30, 40));
        assert_eq!(small.policy(), "this pool counts 10/40 of its demand (split by maxReplicas × tasksPerReplica)");
        let even = vec![consumer("a", true, 20), consumer("b", true, 20)];
        let (a, b) = (Share::among(even.clone(), "a"), Share::among(even, "b"));
        assert_eq!((a.part(8), b.part(8)), (4, 4));
        assert_eq!((a.part(3), b.part(3)), (2, 1), "ties go to the name first in order");
    }

    #[test]
    fn a_queue_belongs_to_the_pool_whose_spec_queue_it_is() {
        let c = vec![consumer("general", false, 30), consumer("urgent", true, 5)];
        let general = Share::among(c.clone(), "general");
        let urgent = Share::among(c, "urgent");
        assert_eq!((general.part(9), urgent.part(9)), (0, 9));
        assert_eq!(general.others(), "urgent (spec.queue)");
        assert_eq!(
            general.policy(),
            "counted by urgent (its spec.queue), not here: this pool's workers take from it as extra capacity"
        );
        // Nobody's spec.queue: every consumer owns a part.
        let c = vec![consumer("x", false, 10), consumer("y", false, 10)];
        assert_eq!(Share::among(c, "y").part(10), 5);
    }

    #[test]
    fn a_pool_without_capacity_takes_no_part() {
        let c = vec![consumer("off", true, 0), consumer("on", true, 10)];
        assert_eq!(Share::among(c.clone(), "off").part(5), 0);
        assert_eq!(Share::among(c, "on").part(5), 5);
        let none = vec![consumer("a", true, 0), consumer("b", true, 0)];
        assert_eq!(Share::among(none.clone(), "a").part(5) + Share::among(none, "b").part(5), 5);
    }

    #[test]
    fn the_reason_note_names_the_share() {
        let c = vec![consumer("a", true, 20), consumer("b", true, 20)];
        let q = QueueReading { queue: "shared".into(), depth: depth(8, 0, vec![]), share: Share::among(c, "a") };
        let d = demand(&[q], 0, Duration::from_secs(30));
        assert_eq!(d.load.pending, 4);
        assert_eq!(d.pending_by_queue["shared"], 8);
        assert_eq!(
            d.shared_note.as_deref(),
            Some("queue shared shared with b (spec.queue): counts 4 of 8 pending and 0 of 0 in flight (share 20/40)")
        );
    }

    /// Random consumer sets and counts: every message is counted by exactly one pool, owners
    /// get their proportional part within one message, non-owners nothing, and the replicas
    /// asked for across the pools cover the queue once (not once per pool).
    #[test]
    fn shares_count_every_message_once() {
        let mut rnd = crate::xorshift(0x2545_F491_4F6C_DD1D);
        for _ in 0..20_000 {
            let k = 1 + rnd(5) as usize;
            let consumers: Vec<Consumer> =
                (0..k).map(|i| consumer(&format!("p{i}"), rnd(3) != 0, rnd(4) * rnd(50))).collect();
            let tprs: Vec<i64> = (0..k).map(|_| 1 + rnd(8)).collect();
            let n = rnd(1000);
            let shares: Vec<Share> = consumers.iter().map(|c| Share::among(consumers.clone(), &c.name)).collect();
            let parts: Vec<i64> = shares.iter().map(|s| s.part(n)).collect();
            assert_eq!(parts.iter().sum::<i64>(), n, "{consumers:?} {n} -> {parts:?}");
            let any_primary = consumers.iter().any(|c| c.primary);
            let total: i64 = consumers.iter().filter(|c| c.primary || !any_primary).map(|c| c.weight).sum();
            for (i, c) in consumers.iter().enumerate() {
                let owner = c.primary || !any_primary;
                if !owner {
                    assert_eq!(parts[i], 0, "a non-owner counts nothing");
                } else if total > 0 {
                    let exact = n as f64 * c.weight as f64 / total as f64;
                    assert!((parts[i] as f64 - exact).abs() < 1.0, "{c:?}: {} vs {exact}", parts[i]);
                }
            }
            // Replicas across pools: capacity for every message, and no more than counting the
            // queue once at the smallest tasksPerReplica plus one rounding per extra pool.
            let replicas: i64 = parts.iter().zip(&tprs).map(|(p, t)| (p + t - 1) / t).sum();
            let capacity: i64 = parts.iter().zip(&tprs).map(|(p, t)| (p + t - 1) / t * t).sum();
            assert!(capacity >= n);
            let t_min = *tprs.iter().min().unwrap();
            let extra_pools = k as i64 - 1;
            assert!(replicas <= (n + t_min - 1) / t_min + extra_pools, "{replicas} replicas for {n}");
        }
    }
}
