//! Replicas for a wait target (pure): the fewest replicas with which every task waiting now is
//! expected to start within `targetWait`, and arrivals are kept up with (docs/scaling.md).
//!
//! A model of one pool: the free slots of the replicas ready now take tasks at once; after that
//! each replica starts `per_replica` tasks a second (its concurrency over the mean task
//! duration: Little's law); a replica added now takes `concurrency` tasks when it comes up,
//! `startup` from now, then serves at the same rate; tasks arrive at `arrivals` a second. The
//! last of the `backlog` tasks waiting now starts when what the pool has started since now,
//! minus what arrived meanwhile, reaches the backlog (first come, first served, as a Redis list
//! is).
//!
//! Not wired into the controller yet (issue 23): the estimator that measures these figures from
//! the workers' heartbeats comes next.

use std::time::Duration;

/// What the law needs, measured for one pool.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// Tasks one replica starts per second while busy (concurrency / mean task seconds).
    pub per_replica: f64,
    /// Tasks one replica runs at once.
    pub concurrency: f64,
    /// Tasks arriving per second.
    pub arrivals: f64,
    /// From a scale-up to the new replica's first task.
    pub startup: Duration,
}

/// The pool now and what it may do.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pool {
    /// Tasks waiting now that only a new start can take (not held by a live worker).
    pub backlog: i64,
    /// Replicas ready now.
    pub ready: i32,
    /// Free slots of the ready replicas now (concurrency minus running tasks, by heartbeat).
    pub idle_slots: i64,
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub target: Duration,
}

/// The law's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct ForWait {
    pub replicas: i32,
    /// When the last task waiting now is expected to start with `replicas` (None: never, the
    /// pool cannot keep up with arrivals even at `max_replicas`).
    pub expected_wait: Option<Duration>,
    /// `max_replicas` cannot meet the target.
    pub at_max: bool,
}

/// Seconds until the last of `pool.backlog` tasks starts with `n` replicas; None when it never
/// does (the backlog grows faster than it drains).
pub fn expected_wait(pool: &Pool, m: &Measured, n: i32) -> Option<f64> {
    let backlog = pool.backlog.max(0) as f64;
    let n = n.max(0);
    let ready = pool.ready.clamp(0, n);
    let full_rate = f64::from(n) * m.per_replica - m.arrivals;
    if backlog == 0.0 {
        return (full_rate >= 0.0).then_some(0.0); // enough if arrivals are kept up with
    }
    if m.per_replica <= 0.0 || m.concurrency <= 0.0 {
        return None;
    }
    let starts = Starts::new(pool, m, ready, n);
    // `net` is piecewise linear between these times (and jumps at `startup`): look for the
    // first time it reaches the backlog segment by segment.
    let mut times = vec![0.0, starts.task, starts.startup, starts.startup + starts.task];
    times.sort_by(f64::total_cmp);
    times.dedup();
    for pair in times.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let (at_a, before_b) = (starts.net(a), starts.net(b) - starts.jump(b));
        if at_a >= backlog {
            return Some(a);
        }
        if before_b >= backlog {
            return Some(a + (backlog - at_a) * (b - a) / (before_b - at_a));
        }
    }
    let last = *times.last()?;
    let at_last = starts.net(last);
    if at_last >= backlog {
        return Some(last);
    }
    (full_rate > 0.0).then(|| last + (backlog - at_last) / full_rate)
}

/// Tasks started from now to `t` by a pool of `ready` replicas now and `n` in all, minus the
/// arrivals meanwhile.
struct Starts {
    /// Mean task seconds.
    task: f64,
    startup: f64,
    /// Free slots now, and busy ones (they free up evenly over one task time).
    idle: f64,
    busy: f64,
    /// Slots of the replicas added now.
    added: f64,
    arrivals: f64,
}

impl Starts {
    fn new(pool: &Pool, m: &Measured, ready: i32, n: i32) -> Self {
        let slots = f64::from(ready) * m.concurrency;
        // Fewer replicas than ready ones (a scale-in): the remaining ones' share of the free slots.
        let idle = (pool.idle_slots.max(0) as f64 * f64::from(ready) / f64::from(pool.ready.max(1))).min(slots);
        Self {
            task: m.concurrency / m.per_replica,
            startup: m.startup.as_secs_f64(),
            idle,
            busy: slots - idle,
            added: f64::from(n - ready) * m.concurrency,
            arrivals: m.arrivals,
        }
    }

    /// What comes up at once at `t`: the added replicas' free slots at `startup`.
    fn jump(&self, t: f64) -> f64 {
        if t == self.startup {
            self.added
        } else {
            0.0
        }
    }

    fn net(&self, t: f64) -> f64 {
        let after = |since: f64| (t - since).max(0.0);
        // The free slots take tasks now and again once those end; busy ones as they free up.
        let ready = self.idle + self.busy / self.task * t + self.idle / self.task * after(self.task);
        let added =
            if t >= self.startup { self.added + self.added / self.task * after(self.startup + self.task) } else { 0.0 };
        ready + added - self.arrivals * t
    }
}

/// The fewest replicas within the bounds whose expected wait is at most the target.
pub fn replicas_for_wait(pool: &Pool, m: &Measured) -> ForWait {
    let target = pool.target.as_secs_f64();
    let lo = pool.min_replicas.max(0);
    let hi = pool.max_replicas.max(lo);
    // The wait falls as replicas are added (each serves at the same rate): the first that meets
    // the target is the fewest. A binary search keeps it O(log max).
    let meets = |n: i32| expected_wait(pool, m, n).is_some_and(|w| w <= target);
    if !meets(hi) {
        let wait = expected_wait(pool, m, hi).map(Duration::from_secs_f64);
        return ForWait { replicas: hi, expected_wait: wait, at_max: true };
    }
    let (mut low, mut high) = (lo, hi);
    while low < high {
        let mid = low + (high - low) / 2;
        if meets(mid) {
            high = mid;
        } else {
            low = mid + 1;
        }
    }
    ForWait { replicas: low, expected_wait: expected_wait(pool, m, low).map(Duration::from_secs_f64), at_max: false }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `ready` idle replicas of concurrency 4.
    fn pool(backlog: i64, ready: i32, target_s: u64) -> Pool {
        let idle_slots = i64::from(ready) * 4;
        Pool { backlog, ready, idle_slots, min_replicas: 0, max_replicas: 500, target: Duration::from_secs(target_s) }
    }

    fn measured(concurrency: f64, task_s: f64, arrivals: f64, startup_s: u64) -> Measured {
        Measured { per_replica: concurrency / task_s, concurrency, arrivals, startup: Duration::from_secs(startup_s) }
    }

    #[test]
    fn the_issues_cases() {
        // 2 000 tasks of 50 ms at concurrency 4: the one idle worker takes 4 at once and then
        // starts 80 a second, so the last starts after 24.95 s: within a 30 s target it is enough
        // (the list-length formula asks for 500).
        let burst = replicas_for_wait(&pool(2000, 1, 30), &measured(4.0, 0.05, 0.0, 20));
        assert_eq!(burst.replicas, 1, "{burst:?}");
        assert_eq!(burst.expected_wait, Some(Duration::from_secs_f64(0.05 + 1996.0 / 80.0)));
        // A 10 s target with a 20 s startup: new workers come too late, and one cannot do it.
        let tight = replicas_for_wait(&pool(2000, 1, 10), &measured(4.0, 0.05, 0.0, 20));
        assert!(tight.at_max, "{tight:?}");
        // A 24 s target: one worker alone needs 25 s; with a second one, 4 + 80·19.95 + 4 = 1 604
        // have started when it comes up at 20 s, and 160 a second after its first tasks end.
        assert_eq!(replicas_for_wait(&pool(2000, 1, 24), &measured(4.0, 0.05, 0.0, 20)).replicas, 2);
        // 40 tasks of 2 minutes at concurrency 4, nothing ready, 30 s startup: each new replica
        // takes its 4 when it comes up, so 10 start all 40 at 30 s (the list-length formula asks
        // 10 too, whatever the target); with a 20 s target nothing can, so max.
        let long = replicas_for_wait(&pool(40, 0, 60), &measured(4.0, 120.0, 0.0, 30));
        assert_eq!((long.replicas, long.expected_wait), (10, Some(Duration::from_secs(30))), "{long:?}");
        assert!(replicas_for_wait(&pool(40, 0, 20), &measured(4.0, 120.0, 0.0, 30)).at_max);
    }

    #[test]
    fn nothing_waiting_needs_only_the_arrivals_kept_up_with() {
        let m = measured(2.0, 1.0, 5.0, 10); // 2 per replica per second, 5 arrive per second
        let r = replicas_for_wait(&pool(0, 0, 30), &m);
        assert_eq!(r.replicas, 3);
        assert_eq!(replicas_for_wait(&pool(0, 0, 30), &measured(2.0, 1.0, 0.0, 10)).replicas, 0);
    }

    #[test]
    fn arrivals_faster_than_max_never_meet_the_target() {
        let r = replicas_for_wait(
            &Pool { max_replicas: 3, ..pool(100, 3, 30) },
            &measured(1.0, 1.0, 10.0, 5), // 3 per second at most, 10 arrive
        );
        assert_eq!((r.replicas, r.at_max, r.expected_wait), (3, true, None));
    }

    proptest! {
        #[test]
        fn bounded_and_monotone(
            backlog in 0i64..100_000,
            more in 0i64..10_000,
            ready in 0i32..50,
            min in 0i32..5,
            max in 5i32..300,
            task_ms in 1u64..600_000,
            longer_ms in 0u64..100_000,
            concurrency in 1u32..32,
            arrivals in 0.0f64..200.0,
            startup_s in 0u64..120,
            target_s in 1u64..600,
        ) {
            let idle_slots = i64::from(ready) * i64::from(concurrency) / 2;
            let p = Pool { backlog, ready, idle_slots, min_replicas: min, max_replicas: max, target: Duration::from_secs(target_s) };
            let m = measured(f64::from(concurrency), task_ms as f64 / 1000.0, arrivals, startup_s);
            let r = replicas_for_wait(&p, &m);
            prop_assert!(r.replicas >= min && r.replicas <= max, "{r:?}");
            if !r.at_max {
                prop_assert!(r.expected_wait.is_some_and(|w| w <= p.target), "{r:?}");
                // The search assumes more replicas never wait longer.
                let t = p.target.as_secs_f64();
                for more in [1, 7, 40] {
                    let w = expected_wait(&p, &m, (r.replicas + more).min(max));
                    prop_assert!(w.is_some_and(|w| w <= t + 1e-9), "{r:?} with {more} more: {w:?}");
                }
            }
            // More waiting, or longer tasks: never fewer replicas.
            let bigger = replicas_for_wait(&Pool { backlog: backlog + more, ..p }, &m);
            prop_assert!(bigger.replicas >= r.replicas, "{r:?} then {bigger:?}");
            let slower = measured(f64::from(concurrency), (task_ms + longer_ms) as f64 / 1000.0, arrivals, startup_s);
            let slower = replicas_for_wait(&p, &slower);
            prop_assert!(slower.replicas >= r.replicas, "{r:?} then {slower:?}");
        }
    }
}
