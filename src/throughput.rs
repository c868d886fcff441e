//! A pool's task duration and throughput from its workers' heartbeats (pure; issue 23, not
//! wired in yet).
//!
//! Every heartbeat carries `active` (tasks running now) and `processed` (tasks received since
//! the worker started). Over a window, the tasks a worker completed are the growth of
//! `processed` minus the growth of `active`, and the time its slots were busy is the integral of
//! `active`; by Little's law the mean task duration is that busy time over the completions.
//! Idle time does not enter: a pool that is idle half the time still has its tasks' true
//! duration. Too few completions give no estimate (the caller falls back to `tasksPerReplica`).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Completions needed in the window before a duration is trusted.
pub const MIN_COMPLETIONS: i64 = 5;

/// One heartbeat's figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub at: Instant,
    pub active: i64,
    pub processed: i64,
}

/// The heartbeats of a pool's workers within a window.
#[derive(Debug, Default)]
pub struct Window {
    by_worker: HashMap<String, VecDeque<Sample>>,
    span: Duration,
}

/// What the window says.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Mean task duration.
    pub mean_task: Duration,
    /// Tasks completed per second by the whole pool.
    pub completions_per_second: f64,
    pub completions: i64,
}

impl Window {
    pub fn new(span: Duration) -> Self {
        Self { by_worker: HashMap::new(), span }
    }

    /// A heartbeat of `worker`. A `processed` below the last one is a restarted worker: its
    /// history starts again.
    pub fn add(&mut self, worker: &str, s: Sample) {
        let samples = self.by_worker.entry(worker.to_string()).or_default();
        if samples.back().is_some_and(|last| s.processed < last.processed || s.at < last.at) {
            samples.clear();
        }
        samples.push_back(s);
        while samples.front().is_some_and(|f| s.at.saturating_duration_since(f.at) > self.span) {
            samples.pop_front();
        }
    }

    /// Forget a worker (offline, or gone).
    pub fn remove(&mut self, worker: &str) {
        self.by_worker.remove(worker);
    }

    pub fn estimate(&self) -> Option<Estimate> {
        let (mut busy_seconds, mut completions, mut seconds) = (0.0, 0, 0.0f64);
        for samples in self.by_worker.values() {
            let (Some(first), Some(last)) = (samples.front(), samples.back()) else { continue };
            // Completed = received minus still running.
            completions += (last.processed - first.processed) - (last.active - first.active);
            busy_seconds += samples
                .iter()
                .zip(samples.iter().skip(1))
                .map(|(a, b)| (a.active + b.active) as f64 / 2.0 * b.at.duration_since(a.at).as_secs_f64())
                .sum::<f64>();
            seconds = seconds.max(last.at.duration_since(first.at).as_secs_f64());
        }
        if completions < MIN_COMPLETIONS || seconds <= 0.0 {
            return None;
        }
        Some(Estimate {
            mean_task: Duration::from_secs_f64(busy_seconds / completions as f64),
            completions_per_second: completions as f64 / seconds,
            completions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker with `slots` always busy on tasks of `task` seconds, heard every 2 s.
    fn busy_worker(w: &mut Window, name: &str, t0: Instant, slots: i64, task: f64, beats: u32) {
        for i in 0..beats {
            let t = f64::from(i) * 2.0;
            let processed = (t / task * slots as f64).floor() as i64 + slots; // received: done + running
            w.add(name, Sample { at: t0 + Duration::from_secs_f64(t), active: slots, processed });
        }
    }

    #[test]
    fn busy_workers_give_their_task_duration() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(60));
        busy_worker(&mut w, "a@p-1", t0, 4, 0.05, 20);
        busy_worker(&mut w, "a@p-2", t0, 4, 0.05, 20);
        let e = w.estimate().unwrap();
        assert!((e.mean_task.as_secs_f64() - 0.05).abs() < 0.001, "{e:?}");
        assert!((e.completions_per_second - 160.0).abs() < 2.0, "{e:?}");
    }

    #[test]
    fn idle_time_does_not_make_tasks_look_longer() {
        // 10 s tasks, one slot, busy only every other 10 s: half the throughput, same duration.
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(120));
        let mut processed = 0;
        for i in 0..=50 {
            let t = f64::from(i) * 2.0;
            let cycle = (t / 10.0) as i64;
            let active = i64::from(cycle % 2 == 0 && t < 100.0);
            if active == 1 && (t % 10.0) == 0.0 {
                processed += 1; // a task received at the start of each busy period
            }
            w.add("a@p-1", Sample { at: t0 + Duration::from_secs_f64(t), active, processed });
        }
        let e = w.estimate().unwrap();
        assert!((e.mean_task.as_secs_f64() - 10.0).abs() < 1.0, "{e:?}");
    }

    /// Recorded from a real Celery 5 worker (`-c 2`, the demo app's `record` task at
    /// `TASK_SCALE=0.5`: 0.5 s each) on a real redis-server, subscribed to
    /// `/0.celeryev/worker.*`: 100 tasks, 20 s idle, 40 tasks, then idle (one line per message,
    /// `t` in seconds since the recording began).
    const RECORDED: &str = include_str!("../tests/data/heartbeats-0.5s-c2.jsonl");

    fn replay(span: Duration, until: f64) -> Window {
        let t0 = Instant::now();
        let mut w = Window::new(span);
        for line in RECORDED.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let t = v["t"].as_f64().unwrap();
            if t > until {
                break;
            }
            let payload = v["payload"].as_str().unwrap().as_bytes();
            if let Some(crate::broker::workers::WorkerEvent::Alive { hostname, active, processed: Some(p), .. }) =
                crate::broker::heartbeat::parse_event(payload)
            {
                w.add(&hostname, Sample { at: t0 + Duration::from_secs_f64(t), active, processed: p });
            }
        }
        w
    }

    #[test]
    fn a_real_workers_heartbeats_give_its_task_duration() {
        // The whole recording (busy, idle, busy, idle): 140 tasks of 0.5 s.
        let e = replay(Duration::from_secs(120), f64::MAX).estimate().unwrap();
        assert_eq!(e.completions, 140);
        let mean = e.mean_task.as_secs_f64();
        assert!((mean - 0.5).abs() <= 0.5 * 0.15, "mean task {mean:.3} s, want 0.5 s within 15 %");
        // In the middle of the first burst (a 10 s window): 2 slots / 0.5 s = 4 tasks a second.
        let busy = replay(Duration::from_secs(10), 25.0).estimate().unwrap();
        assert!((busy.completions_per_second - 4.0).abs() <= 0.6, "{busy:?}");
        assert!((busy.mean_task.as_secs_f64() - 0.5).abs() <= 0.075, "{busy:?}");
        println!("recorded: whole {mean:.3} s over {} tasks; first burst {busy:?}", e.completions);
        // Before the first task ends there is nothing to say.
        assert_eq!(replay(Duration::from_secs(120), 9.0).estimate(), None);
    }

    #[test]
    fn too_few_completions_or_a_restart_give_no_estimate_yet() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(60));
        busy_worker(&mut w, "a@p-1", t0, 1, 30.0, 10); // 20 s: no task ended yet
        assert_eq!(w.estimate(), None);
        busy_worker(&mut w, "a@p-2", t0, 4, 0.5, 20);
        assert!(w.estimate().is_some());
        // p-2 restarts (processed back to 0): its history starts again.
        w.add("a@p-2", Sample { at: t0 + Duration::from_secs(40), active: 0, processed: 0 });
        assert_eq!(w.estimate(), None);
    }
}
