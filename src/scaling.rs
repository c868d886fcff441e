//! The scaling decision (pure): broker depth + bounds + recent history -> desired replicas.
//!
//! Rules, in order:
//! 1. No broker data -> keep the current replica count (never decide on missing data), unless
//!    `fallbackReplicas` is set and the broker has been unreadable for `fallbackAfter`.
//! 2. demand = pending (+ in flight with `countInFlight`); raw = ceil(demand / tasksPerReplica);
//!    at zero replicas, only leave zero once pending >= activationThreshold. Tasks scheduled
//!    beyond `etaHorizon` are not demand (see `demand`), nor are orphans, messages whose
//!    worker is gone (see `broker::workers`).
//! 3. Clamp to [minReplicas, maxReplicas].
//! 4. Scale-up is immediate; scale-down goes only to the highest recommendation seen within the
//!    stabilization window, so a short lull does not stop workers needed a moment later.
//! 5. `scaleUp.maxStep` / `scaleDown.maxStep` bound the change per decision.
//! 6. Never zero replicas while messages are unacked (scheduled ones and orphans included): a
//!    worker must hold them until due, and only a running worker restores them.
//!
//! A paused pool (annotation) keeps its count whatever the broker says.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::crd::PAUSED_ANNOTATION;

/// The knobs of one TaskQueue (from a validated spec).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Count in-flight (unacked) messages as demand (`spec.scaling.countInFlight`).
    pub count_in_flight: bool,
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub tasks_per_replica: i64,
    pub activation_threshold: i64,
    pub stabilization_window: Duration,
    pub scale_up_max_step: Option<i32>,
    pub scale_down_max_step: Option<i32>,
    /// With a step limit, the next step comes this long after the last change (the poll
    /// interval): the Deployment write that a step causes wakes the reconciler at once, and
    /// without this the steps would follow each other in milliseconds.
    pub step_interval: Duration,
    /// (`fallbackReplicas`, `fallbackAfter`).
    pub fallback: Option<(i32, Duration)>,
    /// Paused by annotation: hold the current count.
    pub paused: bool,
}

impl Bounds {
    /// Plain bounds: no steps, no fallback.
    pub fn new(min_replicas: i32, max_replicas: i32, tasks_per_replica: i64, stabilization_window: Duration) -> Self {
        Self {
            count_in_flight: true,
            min_replicas,
            max_replicas,
            tasks_per_replica,
            activation_threshold: 1,
            stabilization_window,
            scale_up_max_step: None,
            scale_down_max_step: None,
            step_interval: Duration::ZERO,
            fallback: None,
            paused: false,
        }
    }
}

/// The recommendations of one TaskQueue that can still be the highest in the window: a
/// sliding-window maximum. Entries are oldest first with strictly falling values (a newer
/// recommendation evicts every older one not above it), so the first entry is the highest and
/// the length never exceeds `maxReplicas + 1`, however long the window and short the poll.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    recommendations: VecDeque<(Instant, i32)>,
    /// When the replica count last changed: with a step limit, one step per `step_interval`.
    last_change: Option<Instant>,
}

impl History {
    fn record(&mut self, now: Instant, replicas: i32, window: Duration) {
        while self.recommendations.back().is_some_and(|&(_, r)| r <= replicas) {
            self.recommendations.pop_back();
        }
        self.recommendations.push_back((now, replicas));
        while self.recommendations.front().is_some_and(|&(t, _)| now.saturating_duration_since(t) > window) {
            self.recommendations.pop_front();
        }
    }

    fn highest(&self) -> Option<i32> {
        self.recommendations.front().map(|&(_, r)| r)
    }

    pub fn is_empty(&self) -> bool {
        self.recommendations.is_empty()
    }

    pub fn len(&self) -> usize {
        self.recommendations.len()
    }

    /// Start the window afresh (after an outage or a pause), remembering the last change.
    fn restart(&mut self) {
        self.recommendations.clear();
    }
}

/// What the broker holds for one pool: messages waiting, and messages fetched by workers but
/// not acknowledged (kombu's `unacked`), split into in flight (prefetched, `acks_late` running,
/// ETA due within `etaHorizon`) and scheduled (ETA beyond it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    pub pending: i64,
    pub in_flight: i64,
    pub scheduled: i64,
    /// Unacked messages whose worker is gone (see `broker::workers`): not demand.
    pub orphaned: i64,
}

/// This tick's view of the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    Known(Load),
    /// The broker could not be read, for this long so far.
    Unknown {
        for_: Duration,
    },
}

impl Observation {
    pub fn pending(pending: i64) -> Self {
        Self::Known(Load { pending, ..Load::default() })
    }
}

/// What to do and why; `reason` goes to status, events and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub replicas: i32,
    /// This tick's own recommendation; differs from `replicas` while a scale-down waits out the
    /// window, a step limit applies, or the unacked guard holds a replica.
    pub recommended: i32,
    pub reason: String,
    /// The count and its reason without the change ("at 3: 12 pending / 4 per replica"): what
    /// holds now, for a condition. `reason` says what this decision changed ("scaled up 0 ->
    /// 3: ..."), which the next decision no longer says: a condition with it would be written
    /// once more after every change.
    pub state: String,
    /// True when something other than demand set the count: a replica bound, the stabilization
    /// window, a step limit, the unacked guard, or missing data.
    pub limited: bool,
    /// Demand needs more than `maxReplicas`: the pool runs at its cap with work left waiting
    /// (an alert, not a detail: `ScalingLimited` then has reason `AtMaxReplicas`).
    pub at_max: bool,
}

/// Decide the replica count. `current` is the Deployment's `spec.replicas` (None before it
/// exists).
pub fn decide(
    bounds: &Bounds,
    current: Option<i32>,
    observation: Observation,
    history: &mut History,
    now: Instant,
) -> Decision {
    let current_or_min = current.unwrap_or(bounds.min_replicas);
    if bounds.paused {
        // Scaling resumes with a fresh window, as after an outage.
        history.restart();
        let reason = format!("paused by annotation {PAUSED_ANNOTATION}=true: holding at {current_or_min}");
        return Decision {
            replicas: current_or_min,
            recommended: current_or_min,
            state: reason.clone(),
            reason,
            limited: true,
            at_max: false,
        };
    }
    let Load { pending, in_flight, scheduled, orphaned } = match observation {
        Observation::Known(load) => load,
        Observation::Unknown { for_ } => {
            // Forget the window: when data returns it starts afresh from what runs then, rather
            // than acting on recommendations from before the outage.
            history.restart();
            let (replicas, why) = match bounds.fallback {
                // The text names fallbackAfter, not the time so far: it stays the same through
                // the outage, so the status is not rewritten at every poll.
                Some((fallback, after)) if for_ >= after => (
                    fallback,
                    format!(
                        "broker unreadable for over {}: fallbackReplicas {fallback}",
                        humantime::format_duration(after)
                    ),
                ),
                _ => {
                    let why = format!("holding at {current_or_min}: broker depth unknown");
                    return Decision {
                        replicas: current_or_min,
                        recommended: current_or_min,
                        state: why.clone(),
                        reason: why,
                        limited: true,
                        at_max: false,
                    };
                }
            };
            return Decision {
                replicas,
                recommended: replicas,
                reason: with_change(current, replicas, &why),
                state: format!("at {replicas}: {why}"),
                limited: true,
                at_max: false,
            };
        }
    };
    if history.is_empty() {
        // After a (re)start the window begins now: seed it with what runs, so a restart of the
        // operator never causes an immediate scale-down.
        history.record(now, current_or_min, bounds.stabilization_window);
    }

    let tpr = bounds.tasks_per_replica.max(1);
    let (demand, mut why) = if bounds.count_in_flight && in_flight > 0 {
        (pending.saturating_add(in_flight), format!("{pending} pending + {in_flight} in flight / {tpr} per replica"))
    } else {
        (pending, format!("{pending} pending / {tpr} per replica"))
    };
    let raw = if current_or_min == 0 && pending < bounds.activation_threshold && in_flight == 0 {
        why = format!("{pending} pending, below activationThreshold {}", bounds.activation_threshold);
        0
    } else {
        i32::try_from(demand.saturating_add(tpr - 1) / tpr).unwrap_or(i32::MAX)
    };
    if scheduled > 0 {
        why = format!("{why} ({scheduled} scheduled beyond etaHorizon, not counted)");
    }
    if orphaned > 0 {
        why = format!("{why} ({orphaned} orphaned by a worker that is gone, not counted)");
    }
    let recommended = raw.clamp(bounds.min_replicas, bounds.max_replicas);
    let mut limited = recommended != raw;
    if recommended != raw {
        let bound = if raw < bounds.min_replicas { "minReplicas" } else { "maxReplicas" };
        why = format!("{why} = {raw}, clamped to {bound} {recommended}");
    }
    history.record(now, recommended, bounds.stabilization_window);

    let mut replicas = if recommended >= current_or_min {
        recommended
    } else {
        let held = history.highest().unwrap_or(recommended).clamp(bounds.min_replicas, bounds.max_replicas);
        if held > recommended {
            limited = true;
            why = format!(
                "{why}; scale-down to {recommended} waits out the {} stabilization window",
                humantime::format_duration(bounds.stabilization_window)
            );
        }
        held.min(current_or_min)
    };
    // Steps only apply to an existing Deployment; the bounds win over them (a lowered
    // maxReplicas or raised minReplicas applies at once).
    if let Some(c) = current {
        // A step too soon after the last change is no step at all (held until the interval ends).
        let too_soon = history.last_change.is_some_and(|t| now.saturating_duration_since(t) < bounds.step_interval);
        let step_size = |step: i32| if too_soon { 0 } else { step };
        if let Some(step) =
            bounds.scale_up_max_step.filter(|s| replicas > c.saturating_add(*s) || (too_soon && replicas > c))
        {
            replicas = c.saturating_add(step_size(step)).clamp(bounds.min_replicas, bounds.max_replicas);
            why = format!("{why}; up by at most {step} per step (scaleUp.maxStep), one step per poll");
            limited = true;
        }
        if let Some(step) =
            bounds.scale_down_max_step.filter(|s| replicas < c.saturating_sub(*s) || (too_soon && replicas < c))
        {
            replicas = c.saturating_sub(step_size(step)).clamp(bounds.min_replicas, bounds.max_replicas);
            why = format!("{why}; down by at most {step} per step (scaleDown.maxStep), one step per poll");
            limited = true;
        }
    }
    // Nothing but a running worker restores unacked messages (kombu's visibility-timeout sweep
    // runs inside workers) or runs a scheduled one when due, so never leave zero workers while
    // any exist.
    let unacked = in_flight.saturating_add(scheduled).saturating_add(orphaned);
    if replicas == 0 && unacked > 0 && bounds.max_replicas > 0 {
        why = format!(
            "{why}; holding 1 replica: {unacked} unacked message(s) need a running worker to hold or restore them"
        );
        limited = true;
        replicas = 1;
    }
    if current.is_some_and(|c| c != replicas) {
        history.last_change = Some(now);
    }
    Decision {
        replicas,
        recommended,
        reason: with_change(current, replicas, &why),
        state: format!("at {replicas}: {why}"),
        limited,
        at_max: raw > bounds.max_replicas,
    }
}

fn with_change(current: Option<i32>, replicas: i32, why: &str) -> String {
    match current {
        Some(c) if replicas > c => format!("scaled up {c} -> {replicas}: {why}"),
        Some(c) if replicas < c => format!("scaled down {c} -> {replicas}: {why}"),
        Some(c) => format!("steady at {c}: {why}"),
        None => format!("created at {replicas}: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pending: i64) -> Observation {
        Observation::pending(pending)
    }

    fn unknown(secs: u64) -> Observation {
        Observation::Unknown { for_: Duration::from_secs(secs) }
    }

    fn bounds(min: i32, max: i32, tpr: i64, activation: i64, window_s: u64) -> Bounds {
        Bounds { activation_threshold: activation, ..Bounds::new(min, max, tpr, Duration::from_secs(window_s)) }
    }

    /// One-shot decisions with an empty history (window 0 = no stabilization).
    #[test]
    fn table() {
        #[rustfmt::skip]
        type Case = (&'static str, Bounds, Option<i32>, Option<i64>, i32);
        let cases: &[Case] = &[
            // name,                        bounds,                   current, pending, want
            ("empty queue at min 0", bounds(0, 10, 2, 1, 0), Some(0), Some(0), 0),
            ("one task leaves zero", bounds(0, 10, 2, 1, 0), Some(0), Some(1), 1),
            ("ceil division", bounds(0, 10, 2, 1, 0), Some(1), Some(5), 3),
            ("exact division", bounds(0, 10, 2, 1, 0), Some(1), Some(6), 3),
            ("clamped to max", bounds(0, 4, 1, 1, 0), Some(1), Some(100), 4),
            ("clamped to min", bounds(2, 4, 1, 1, 0), Some(2), Some(0), 2),
            ("below activation stays 0", bounds(0, 10, 1, 5, 0), Some(0), Some(4), 0),
            ("at activation leaves 0", bounds(0, 10, 1, 5, 0), Some(0), Some(5), 5),
            ("activation only from zero", bounds(0, 10, 1, 5, 0), Some(2), Some(3), 3),
            ("no data keeps current", bounds(0, 10, 1, 1, 0), Some(7), None, 7),
            ("no data, no deployment: min", bounds(1, 10, 1, 1, 0), None, None, 1),
            ("new deployment sized", bounds(0, 10, 4, 1, 0), None, Some(9), 3),
            ("max 0 means off", bounds(0, 0, 1, 1, 0), Some(0), Some(50), 0),
            ("max lowered below current", bounds(0, 2, 1, 1, 300), Some(5), Some(50), 2),
            ("huge backlog saturates", bounds(0, 10000, 1, 1, 0), Some(1), Some(i64::MAX / 2), 10000),
        ];
        for (name, b, current, pending, want) in cases {
            let got = decide(b, *current, pending.map_or(unknown(0), load), &mut History::default(), Instant::now());
            assert_eq!(got.replicas, *want, "{name}: {}", got.reason);
        }
    }

    #[test]
    fn scale_up_is_immediate_and_scale_down_waits_for_the_window() {
        let b = bounds(0, 10, 1, 1, 60);
        let t0 = Instant::now();
        let mut h = History::default();
        assert_eq!(decide(&b, Some(0), load(6), &mut h, t0).replicas, 6);
        // Queue drains: the 6 seen 10 s ago still wins inside the 60 s window.
        let d = decide(&b, Some(6), load(0), &mut h, t0 + Duration::from_secs(10));
        assert_eq!(d.replicas, 6);
        assert!(d.reason.contains("waits out the 1m stabilization window"), "{}", d.reason);
        // A smaller spike inside the window: still 6.
        assert_eq!(decide(&b, Some(6), load(2), &mut h, t0 + Duration::from_secs(40)).replicas, 6);
        // 6 left the window; the 2 from t=40 s is now the highest.
        let d = decide(&b, Some(6), load(0), &mut h, t0 + Duration::from_secs(61));
        assert_eq!(d.replicas, 2, "{}", d.reason);
        assert!(d.reason.starts_with("scaled down 6 -> 2"), "{}", d.reason);
        assert_eq!(decide(&b, Some(2), load(0), &mut h, t0 + Duration::from_secs(101)).replicas, 0);
        // And straight back up, no waiting.
        let d = decide(&b, Some(0), load(3), &mut h, t0 + Duration::from_secs(102));
        assert_eq!(d.replicas, 3);
        assert!(d.reason.starts_with("scaled up 0 -> 3: 3 pending / 1 per replica"), "{}", d.reason);
    }

    #[test]
    fn restart_does_not_scale_down_before_the_window() {
        let b = bounds(0, 10, 1, 1, 30);
        let t0 = Instant::now();
        let mut h = History::default(); // fresh operator, Deployment already at 4
        assert_eq!(decide(&b, Some(4), load(0), &mut h, t0).replicas, 4);
        assert_eq!(decide(&b, Some(4), load(0), &mut h, t0 + Duration::from_secs(31)).replicas, 0);
    }

    #[test]
    fn missing_data_never_changes_replicas_or_history() {
        let b = bounds(0, 10, 1, 1, 0);
        let mut h = History::default();
        let d = decide(&b, Some(3), unknown(1), &mut h, Instant::now());
        assert_eq!(d.replicas, 3);
        assert_eq!(d.reason, "holding at 3: broker depth unknown");
        assert!(h.is_empty());
    }

    #[test]
    fn reasons_explain_the_numbers() {
        let mut h = History::default();
        let d = decide(&bounds(0, 4, 2, 1, 0), Some(1), load(20), &mut h, Instant::now());
        assert_eq!(d.reason, "scaled up 1 -> 4: 20 pending / 2 per replica = 10, clamped to maxReplicas 4");
        assert!(d.at_max && d.limited, "demand above maxReplicas: at its cap with work waiting");
        let d = decide(&bounds(0, 4, 2, 1, 0), Some(1), load(8), &mut History::default(), Instant::now());
        assert!(!d.at_max, "8 pending / 2 per replica = 4: exactly the cap, nothing left waiting");
        let d = decide(&bounds(3, 4, 2, 1, 0), Some(3), load(0), &mut History::default(), Instant::now());
        assert!(d.limited && !d.at_max, "held up by minReplicas is not at the cap");
        let d = decide(&bounds(0, 4, 1, 3, 0), Some(0), load(2), &mut History::default(), Instant::now());
        assert_eq!(d.reason, "steady at 0: 2 pending, below activationThreshold 3");
        assert_eq!(d.state, "at 0: 2 pending, below activationThreshold 3");
    }

    #[test]
    fn in_flight_counts_as_demand_and_blocks_scale_to_zero() {
        let b = bounds(0, 10, 4, 1, 0);
        let busy = Observation::Known(Load { pending: 2, in_flight: 10, scheduled: 0, ..Load::default() });
        let d = decide(&b, Some(2), busy, &mut History::default(), Instant::now());
        assert_eq!(d.replicas, 3, "ceil((2 + 10) / 4)");
        assert!(d.reason.contains("2 pending + 10 in flight / 4 per replica"), "{}", d.reason);
        let ignore = Bounds { count_in_flight: false, ..b };
        let (mut h, t0) = (History::default(), Instant::now());
        let drained = Observation::Known(Load { pending: 0, in_flight: 2, scheduled: 0, ..Load::default() });
        decide(&ignore, Some(3), drained, &mut h, t0);
        let d = decide(&ignore, Some(3), drained, &mut h, t0 + Duration::from_secs(1));
        assert_eq!(d.replicas, 1, "queue drained but unacked entries remain: {}", d.reason);
        assert!(d.reason.contains("holding 1 replica: 2 unacked message(s)"), "{}", d.reason);
        let d = decide(
            &ignore,
            Some(0),
            Observation::Known(Load { pending: 0, in_flight: 1, scheduled: 0, ..Load::default() }),
            &mut History::default(),
            Instant::now(),
        );
        assert_eq!(d.replicas, 1, "stranded unacked work brings a worker back");
    }

    #[test]
    fn scheduled_tasks_hold_one_worker_but_add_none() {
        let b = bounds(0, 10, 2, 1, 0);
        // 20 countdown tasks held by one worker, nothing else: one replica, not ceil(20 / 2).
        let held = Observation::Known(Load { pending: 0, in_flight: 0, scheduled: 20, ..Load::default() });
        let (t0, mut h) = (Instant::now(), History::default());
        let d = decide(&b, Some(0), held, &mut h, t0);
        assert_eq!(
            d.reason,
            "scaled up 0 -> 1: 0 pending, below activationThreshold 1 (20 scheduled beyond etaHorizon, not \
             counted); holding 1 replica: 20 unacked message(s) need a running worker to hold or restore them"
        );
        let d = decide(&b, Some(1), held, &mut h, t0 + Duration::from_secs(60));
        assert_eq!(d.replicas, 1, "{}", d.reason);
        // With real demand next to them, only the demand counts.
        let busy = Observation::Known(Load { pending: 6, in_flight: 2, scheduled: 20, ..Load::default() });
        assert_eq!(decide(&b, Some(1), busy, &mut History::default(), Instant::now()).replicas, 4);
    }

    #[test]
    fn orphans_of_a_dead_worker_hold_one_worker_but_add_none() {
        let b = bounds(0, 10, 2, 1, 0);
        // A killed worker left 12 prefetched messages: one replica restores them, not six.
        let left = Observation::Known(Load { pending: 0, orphaned: 12, ..Load::default() });
        let d = decide(&b, Some(0), left, &mut History::default(), Instant::now());
        assert_eq!(
            d.reason,
            "scaled up 0 -> 1: 0 pending, below activationThreshold 1 (12 orphaned by a worker that is gone, not \
             counted); holding 1 replica: 12 unacked message(s) need a running worker to hold or restore them"
        );
        let busy = Observation::Known(Load { pending: 6, in_flight: 2, orphaned: 12, ..Load::default() });
        assert_eq!(decide(&b, Some(1), busy, &mut History::default(), Instant::now()).replicas, 4);
    }

    #[test]
    fn a_paused_pool_holds_and_resumes_with_a_fresh_window() {
        let paused = Bounds { paused: true, ..bounds(0, 10, 1, 1, 60) };
        let t0 = Instant::now();
        let mut h = History::default();
        assert_eq!(decide(&paused, Some(2), load(9), &mut h, t0).replicas, 2, "no scale-up while paused");
        let d = decide(&paused, Some(6), load(0), &mut h, t0);
        assert_eq!(
            d,
            Decision {
                replicas: 6,
                recommended: 6,
                reason: "paused by annotation taskqueue.dev/paused=true: holding at 6".into(),
                state: "paused by annotation taskqueue.dev/paused=true: holding at 6".into(),
                limited: true,
                at_max: false
            }
        );
        assert!(h.is_empty());
        assert_eq!(decide(&paused, None, load(9), &mut h, t0).replicas, 0, "created at minReplicas");
        // Unpaused with an empty queue: the window starts now from the 6 running.
        let b = Bounds { paused: false, ..paused };
        assert_eq!(decide(&b, Some(6), load(0), &mut h, t0 + Duration::from_secs(1)).replicas, 6);
        assert_eq!(decide(&b, Some(6), load(0), &mut h, t0 + Duration::from_secs(62)).replicas, 0);
    }

    #[test]
    fn max_steps_bound_each_change() {
        let b = Bounds { scale_up_max_step: Some(2), scale_down_max_step: Some(3), ..bounds(0, 20, 1, 1, 0) };
        let t0 = Instant::now();
        let mut h = History::default();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let d = decide(&b, Some(1), load(10), &mut h, at(1));
        assert_eq!((d.replicas, d.recommended), (3, 10));
        assert!(
            d.limited && d.reason.ends_with("up by at most 2 per step (scaleUp.maxStep), one step per poll"),
            "{}",
            d.reason
        );
        assert_eq!(decide(&b, Some(3), load(10), &mut h, at(2)).replicas, 5, "one more step on the next poll");
        assert_eq!(decide(&b, Some(10), load(0), &mut h, at(3)).replicas, 7);
        let d = decide(&b, Some(7), load(0), &mut h, at(4));
        assert_eq!(
            d.reason,
            "scaled down 7 -> 4: 0 pending / 1 per replica; down by at most 3 per step (scaleDown.maxStep), one step per poll"
        );
        assert_eq!(decide(&b, Some(2), load(0), &mut h, at(5)).replicas, 0, "the last step may be smaller");
        assert_eq!(decide(&b, None, load(10), &mut h, at(6)).replicas, 10, "a new Deployment starts at its size");
        let low = Bounds { max_replicas: 3, ..b };
        assert_eq!(
            decide(&low, Some(12), load(50), &mut h, at(7)).replicas,
            3,
            "a lowered maxReplicas wins over steps"
        );
        // The window still applies first: steps only bound what the window allows.
        let b = Bounds { stabilization_window: Duration::from_secs(60), ..b };
        let mut h = History::default();
        assert_eq!(decide(&b, Some(9), load(9), &mut h, t0).replicas, 9);
        assert_eq!(decide(&b, Some(9), load(0), &mut h, t0 + Duration::from_secs(30)).replicas, 9);
        assert_eq!(decide(&b, Some(9), load(0), &mut h, t0 + Duration::from_secs(61)).replicas, 6);
    }

    #[test]
    fn steps_come_one_poll_apart_however_often_the_decision_runs() {
        // Each step's Deployment write wakes the reconciler at once: a second decision 5 ms
        // later must not take the next step.
        let b = Bounds { scale_up_max_step: Some(2), step_interval: Duration::from_secs(1), ..bounds(0, 10, 1, 1, 0) };
        let t0 = Instant::now();
        let mut h = History::default();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(decide(&b, Some(0), load(10), &mut h, at(0)).replicas, 2);
        let d = decide(&b, Some(2), load(10), &mut h, at(5));
        assert_eq!((d.replicas, d.recommended), (2, 10), "{}", d.reason);
        assert!(d.reason.contains("one step per poll"), "{}", d.reason);
        assert_eq!(decide(&b, Some(2), load(10), &mut h, at(999)).replicas, 2);
        assert_eq!(decide(&b, Some(2), load(10), &mut h, at(1000)).replicas, 4, "the next step, one poll later");
        assert_eq!(decide(&b, Some(4), load(5), &mut h, at(1100)).replicas, 4, "even a small one waits");
        // Without a step limit nothing waits.
        let free = Bounds { scale_up_max_step: None, ..b };
        assert_eq!(decide(&free, Some(4), load(10), &mut h, at(1101)).replicas, 10);
    }

    #[test]
    fn fallback_applies_only_after_fallback_after_and_recovery_restarts_the_window() {
        let b = Bounds { fallback: Some((4, Duration::from_secs(120))), ..bounds(0, 10, 1, 1, 60) };
        let t0 = Instant::now();
        let mut h = History::default();
        assert_eq!(decide(&b, Some(8), load(8), &mut h, t0).replicas, 8);
        let d = decide(&b, Some(8), unknown(119), &mut h, t0 + Duration::from_secs(119));
        assert_eq!((d.replicas, d.reason.as_str()), (8, "holding at 8: broker depth unknown"));
        let d = decide(&b, Some(8), unknown(120), &mut h, t0 + Duration::from_secs(120));
        assert_eq!(d.replicas, 4);
        assert_eq!(d.reason, "scaled down 8 -> 4: broker unreadable for over 2m: fallbackReplicas 4");
        // Back with an empty queue: the window starts now from the 4 running, so no drop to 0
        // until 60 s after recovery (the 8 from before the outage is forgotten).
        let t1 = t0 + Duration::from_secs(200);
        assert_eq!(decide(&b, Some(4), load(0), &mut h, t1).replicas, 4);
        assert_eq!(decide(&b, Some(4), load(0), &mut h, t1 + Duration::from_secs(59)).replicas, 4);
        assert_eq!(decide(&b, Some(4), load(0), &mut h, t1 + Duration::from_secs(61)).replicas, 0);
        // Without fallbackReplicas an outage of any length holds.
        let b = bounds(0, 10, 1, 1, 60);
        assert_eq!(decide(&b, Some(8), unknown(86_400), &mut History::default(), t0).replicas, 8);
    }

    #[test]
    fn history_is_the_window_maximum_and_stays_small() {
        let (t0, window) = (Instant::now(), Duration::from_secs(5));
        let mut h = History::default();
        let mut all: Vec<(Instant, i32)> = Vec::new();
        let mut x: u32 = 7;
        for i in 0..5_000u64 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let (now, r) = (t0 + Duration::from_millis(i * 10), (x >> 16) as i32 % 11);
            h.record(now, r, window);
            all.push((now, r));
            let naive = all.iter().filter(|(t, _)| now.duration_since(*t) <= window).map(|&(_, r)| r).max();
            assert_eq!(h.highest(), naive, "step {i}");
            assert!(h.len() <= 11, "at most maxReplicas + 1 entries, got {}", h.len());
        }
    }

    #[test]
    fn properties_hold_for_random_inputs() {
        let mut rnd = crate::xorshift(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let min = rnd(4) as i32;
            let max = min + rnd(10) as i32;
            let step = |r: i64| (r > 0).then_some(r as i32);
            let b = Bounds {
                count_in_flight: rnd(2) == 0,
                min_replicas: min,
                max_replicas: max,
                tasks_per_replica: 1 + rnd(8),
                activation_threshold: rnd(5),
                stabilization_window: Duration::from_secs(rnd(4) as u64),
                scale_up_max_step: step(rnd(4)),
                scale_down_max_step: step(rnd(4)),
                step_interval: Duration::ZERO,
                fallback: (rnd(2) == 0)
                    .then(|| (min + rnd(u64::try_from(max - min).unwrap() + 1) as i32, Duration::from_secs(3))),
                paused: false,
            };
            let mut h = History::default();
            let t0 = Instant::now();
            let mut current = if rnd(4) == 0 { None } else { Some(rnd(15) as i32) };
            for step in 0..6 {
                let obs = if rnd(5) != 0 {
                    Observation::Known(Load {
                        pending: rnd(100),
                        in_flight: rnd(3) * rnd(10),
                        scheduled: rnd(2) * rnd(30),
                        orphaned: rnd(2) * rnd(20),
                    })
                } else {
                    unknown(rnd(6) as u64)
                };
                let d = decide(&b, current, obs, &mut h, t0 + Duration::from_secs(step));
                match obs {
                    Observation::Unknown { for_ } => match b.fallback {
                        Some((f, after)) if for_ >= after => assert_eq!(d.replicas, f, "fallback after {after:?}"),
                        _ => assert_eq!(d.replicas, current.unwrap_or(b.min_replicas), "missing data changes nothing"),
                    },
                    Observation::Known(l) => {
                        assert!(d.replicas <= b.max_replicas && d.replicas >= b.min_replicas, "{b:?} {l:?} -> {d:?}");
                        if l.in_flight + l.scheduled + l.orphaned > 0 && b.max_replicas > 0 {
                            assert!(d.replicas >= 1, "never zero with unacked work: {d:?}");
                        }
                        // Scheduled tasks and orphans never add replicas: the same load without
                        // them recommends the same count.
                        let without = Observation::Known(Load { scheduled: 0, orphaned: 0, ..l });
                        let mut h2 = History::default();
                        let base = decide(&b, current, without, &mut h2, t0).recommended;
                        let mut h3 = History::default();
                        assert_eq!(
                            decide(&b, current, obs, &mut h3, t0).recommended,
                            base,
                            "scheduled and orphaned are not demand"
                        );
                        if let (Some(c), Some(up)) = (current, b.scale_up_max_step) {
                            if c >= b.min_replicas {
                                assert!(d.replicas <= c + up, "scaleUp.maxStep: {c} -> {d:?}");
                            }
                        }
                        if let (Some(c), Some(down)) = (current, b.scale_down_max_step) {
                            if c <= b.max_replicas {
                                assert!(d.replicas >= c - down, "scaleDown.maxStep: {c} -> {d:?}");
                            }
                        }
                    }
                }
                current = Some(d.replicas);
            }
        }
    }
}
