//! The live page (`/`) and its data (`/api/taskqueues`): every TaskQueue's numbers as its
//! status says them (the same as `kubectl get tq`), the conditions that are not OK, its broker's
//! reaction mode, and the last 30 minutes of pending, in-flight and replicas with the scale
//! events, kept in memory by the operator.
//!
//! The history is recorded by each reconcile and only when a number moved (the series are steps:
//! a quiet pool costs one sample), bounded in time and in count. The view is built from the
//! watch cache on each request, so a namespace outside the operator's watch never shows; it
//! holds no Secret and no broker address.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use kube::runtime::reflector::{ObjectRef, Store};
use kube::ResourceExt;
use serde::Serialize;
use tokio::sync::watch;

use crate::controller::poller::BrokerState;
use crate::crd::{TaskQueue, TaskQueueStatus};
use crate::report::not_ok_conditions;

/// How far back the charts go.
pub const WINDOW: Duration = Duration::from_secs(30 * 60);
/// Most samples kept per TaskQueue (30 minutes of a 1 s poll that changes every time).
pub const MAX_SAMPLES: usize = 1800;
/// Most scale events kept per TaskQueue.
pub const MAX_MARKS: usize = 200;
/// Rows `/api/taskqueues` returns unless asked for another number (`?limit=N`): what the page
/// draws. The most backed-up come first, so a cut keeps the ones worth looking at; a page open
/// on 10 000 TaskQueues must not copy every history every 2 s.
pub const DEFAULT_LIMIT: usize = 300;

/// One point of a TaskQueue's history: unix milliseconds, pending, in flight, desired and ready
/// replicas. Serialized as an array: 30 minutes of 10 000 TaskQueues stay small.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub t: i64,
    pub pending: i64,
    pub in_flight: i64,
    pub desired: i32,
    pub ready: i32,
}

impl Serialize for Sample {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.t, self.pending, self.in_flight, self.desired, self.ready).serialize(s)
    }
}

/// A scale event: when, which way, and the operator's reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mark {
    pub t: i64,
    pub up: bool,
    pub reason: String,
}

/// One TaskQueue's history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Series {
    pub samples: VecDeque<Sample>,
    pub marks: VecDeque<Mark>,
}

impl Series {
    /// Add a sample if a number moved; drop what fell out of the window (keeping the last
    /// sample before it: the value the chart starts from) and what is over the count.
    pub fn record(&mut self, s: Sample) {
        let same =
            |l: &Sample| (l.pending, l.in_flight, l.desired, l.ready) == (s.pending, s.in_flight, s.desired, s.ready);
        if !self.samples.back().is_some_and(same) {
            self.samples.push_back(s);
        }
        let start = s.t - millis(WINDOW);
        while self.samples.len() > MAX_SAMPLES || self.samples.get(1).is_some_and(|n| n.t <= start) {
            self.samples.pop_front();
        }
        while self.marks.front().is_some_and(|m| m.t < start) {
            self.marks.pop_front();
        }
    }

    pub fn mark(&mut self, m: Mark) {
        self.marks.push_back(m);
        if self.marks.len() > MAX_MARKS {
            self.marks.pop_front();
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Now, in unix milliseconds.
pub fn now_millis() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// What the page needs from the running controller; set once it starts.
pub struct Source {
    pub store: Store<TaskQueue>,
    pub broker: Arc<BrokerState>,
    pub leading: watch::Receiver<bool>,
    /// The leader Lease's holder as last seen (None without leader election).
    pub holder: Arc<RwLock<Option<String>>>,
}

/// Shared by the reconciler (which records) and the HTTP server (which shows).
#[derive(Default)]
pub struct Dashboard {
    history: Mutex<HashMap<(String, String), Series>>,
    source: OnceLock<Source>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dashboard")
    }
}

impl Dashboard {
    pub fn connect(&self, source: Source) {
        let _ = self.source.set(source);
    }

    pub fn record(&self, namespace: &str, name: &str, sample: Sample, mark: Option<Mark>) {
        let mut history = self.history.lock().expect("lock");
        let series = history.entry((namespace.to_string(), name.to_string())).or_default();
        if let Some(m) = mark {
            series.mark(m);
        }
        series.record(sample);
    }

    pub fn forget(&self, namespace: &str, name: &str) {
        self.history.lock().expect("lock").remove(&(namespace.to_string(), name.to_string()));
    }

    /// A standby keeps no history (it reconciles nothing): it says so instead.
    pub fn clear(&self) {
        self.history.lock().expect("lock").clear();
    }

    /// The body of `/api/taskqueues[?namespace=NS][&limit=N]`: the first `limit` rows, most
    /// backed-up first (`total` says how many there are).
    pub fn api(&self, namespace: Option<&str>, limit: usize) -> View {
        let Some(src) = self.source.get() else {
            return View::starting();
        };
        let holder = src.holder.read().expect("lock").clone();
        if !*src.leading.borrow() {
            return View { role: "standby", leader: holder, ..View::starting() };
        }
        let mut tqs = src.store.state();
        let namespaces = {
            let mut ns: Vec<String> = tqs.iter().filter_map(|t| t.namespace()).collect();
            ns.sort();
            ns.dedup();
            ns
        };
        tqs.retain(|t| namespace.is_none_or(|n| t.namespace().as_deref() == Some(n)));
        let rows = tqs.iter().map(|t| row(t, src.broker.push_mode_of(&ObjectRef::from_obj(&**t)))).collect();
        let mut view = View { role: "leader", leader: holder, namespaces, ..View::starting() }.with_rows(rows);
        view.task_queues.truncate(limit);
        // Histories are copied for the rows returned only.
        let history = self.history.lock().expect("lock");
        for r in &mut view.task_queues {
            if let Some(series) = history.get(&(r.namespace.clone(), r.name.clone())) {
                r.history = series.clone();
            }
        }
        view
    }
}

/// The answer of `/api/taskqueues`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct View {
    /// `leader` (the numbers are live), `standby` (see `leader`), or `starting`.
    pub role: &'static str,
    /// Who holds the leader Lease (a pod name), when known.
    pub leader: Option<String>,
    pub now: i64,
    pub window_seconds: u64,
    /// Namespaces with TaskQueues (for the filter).
    pub namespaces: Vec<String>,
    /// How many TaskQueues match (`taskQueues` holds at most `limit` of them).
    pub total: usize,
    /// How many of them have work waiting (`pending` > 0).
    pub waiting: usize,
    /// Most backed-up first.
    pub task_queues: Vec<Row>,
}

impl View {
    fn starting() -> Self {
        Self {
            role: "starting",
            leader: None,
            now: now_millis(),
            window_seconds: WINDOW.as_secs(),
            namespaces: Vec::new(),
            total: 0,
            waiting: 0,
            task_queues: Vec::new(),
        }
    }

    fn with_rows(mut self, mut rows: Vec<Row>) -> Self {
        rows.sort_by(|a, b| {
            order(b).cmp(&order(a)).then_with(|| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
        });
        self.total = rows.len();
        self.waiting = rows.iter().filter(|r| r.pending.unwrap_or(0) > 0).count();
        self.task_queues = rows;
        self
    }
}

/// Backed up first: pools with work waiting that cannot take more (at their cap, broker
/// unreadable, invalid, another problem), then the others with work waiting, each by how much.
fn order(r: &Row) -> (i64, i64) {
    let pending = r.pending.unwrap_or(0);
    let urgent = matches!(r.state, "atMax" | "brokerDown" | "invalid" | "problem");
    (i64::from(urgent && pending > 0) + i64::from(pending > 0), pending)
}

/// One TaskQueue on the page.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub namespace: String,
    pub name: String,
    pub queues: Vec<String>,
    pub pending: Option<i64>,
    pub in_flight: Option<i64>,
    pub scheduled: Option<i64>,
    pub desired_replicas: Option<i32>,
    pub ready_replicas: Option<i32>,
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub last_scale_time: Option<String>,
    pub last_scale_reason: Option<String>,
    /// `push` or `poll` (its broker's reaction mode); None before the first read.
    pub mode: Option<&'static str>,
    /// What colour it gets: `ok`, `limited`, `atMax`, `paused`, `brokerDown`, `invalid`,
    /// `problem` (another condition not OK).
    pub state: &'static str,
    pub not_ok: Vec<NotOk>,
    pub history: Series,
}

#[derive(Debug, Serialize)]
pub struct NotOk {
    pub condition: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// One TaskQueue's row (pure), its history left for `api` to fill in.
pub fn row(tq: &TaskQueue, push: Option<bool>) -> Row {
    let status = tq.status.clone().unwrap_or_default();
    let not_ok: Vec<NotOk> = not_ok_conditions(&status.conditions)
        .map(|c| NotOk {
            condition: c.type_.clone(),
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
        .collect();
    Row {
        namespace: tq.namespace().unwrap_or_default(),
        name: tq.name_any(),
        queues: std::iter::once(&tq.spec.queue).chain(&tq.spec.extra_queues).cloned().collect(),
        pending: status.pending,
        in_flight: status.in_flight,
        scheduled: status.scheduled,
        desired_replicas: status.desired_replicas,
        ready_replicas: status.ready_replicas,
        min_replicas: tq.spec.scaling.min_replicas,
        max_replicas: tq.spec.scaling.max_replicas,
        last_scale_time: status.last_scale_time.as_ref().map(|t| t.0.to_string()),
        last_scale_reason: status.last_scale_reason.clone(),
        mode: push.map(|p| if p { "push" } else { "poll" }),
        state: state(&status, &not_ok),
        not_ok,
        history: Series::default(),
    }
}

fn state(status: &TaskQueueStatus, not_ok: &[NotOk]) -> &'static str {
    let has = |cond: &str| not_ok.iter().find(|n| n.condition == cond);
    if has("SpecValid").is_some() {
        "invalid"
    } else if has("BrokerReachable").is_some() {
        "brokerDown"
    } else if has("Paused").is_some() {
        "paused"
    } else if has("ScalingLimited").is_some_and(|n| n.reason == "AtMaxReplicas") {
        "atMax"
    } else if not_ok.iter().any(|n| !matches!(n.condition.as_str(), "ScalingLimited" | "QueueShared")) {
        "problem"
    } else if has("ScalingLimited").is_some() {
        "limited"
    } else if status.conditions.is_empty() {
        "new"
    } else {
        "ok"
    }
}

/// The page: one file, no external asset, fetching `/api/taskqueues` every 2 s.
pub const PAGE: &str = include_str!("dashboard/index.html");

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(t: i64, pending: i64, desired: i32) -> Sample {
        Sample { t, pending, in_flight: 0, desired, ready: desired }
    }

    #[test]
    fn history_keeps_steps_within_the_window_and_the_count() {
        let mut s = Series::default();
        s.record(sample(0, 5, 1));
        s.record(sample(1_000, 5, 1));
        assert_eq!(s.samples.len(), 1, "a number that did not move is no new sample");
        s.record(sample(2_000, 7, 2));
        let w = millis(WINDOW);
        s.record(sample(w + 1_500, 8, 2));
        assert_eq!(s.samples.len(), 3, "the sample at 0 still holds at the window's start (1 500)");
        s.record(sample(w + 2_500, 9, 2));
        assert_eq!(
            s.samples.iter().map(|x| x.t).collect::<Vec<_>>(),
            [2_000, w + 1_500, w + 2_500],
            "the last sample before the window stays: the chart starts from its value"
        );
        for i in 0..(MAX_SAMPLES as i64 + 10) {
            s.record(sample(w + 2_000 + i, i, 1));
        }
        assert_eq!(s.samples.len(), MAX_SAMPLES);
        for i in 0..(MAX_MARKS + 5) {
            s.mark(Mark { t: w + 3_000 + i as i64, up: true, reason: "scaled up".into() });
        }
        assert_eq!(s.marks.len(), MAX_MARKS);
        assert_eq!(serde_json::to_value(sample(1, 2, 3)).unwrap(), json!([1, 2, 0, 3, 3]));
    }

    fn tq(status: serde_json::Value) -> TaskQueue {
        serde_json::from_value(json!({
            "apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue",
            "metadata": {"name": "ai", "namespace": "prod"},
            "spec": {"queue": "ai", "extraQueues": ["ai_low"], "broker": {"urlSecretRef": {"name": "b"}},
                "worker": {"image": "app:1", "app": "app.worker"}, "scaling": {"minReplicas": 0, "maxReplicas": 4}},
            "status": status
        }))
        .unwrap()
    }

    fn cond(t: &str, s: &str, reason: &str) -> serde_json::Value {
        json!({"type": t, "status": s, "reason": reason, "message": format!("{t} says {reason}"),
            "lastTransitionTime": "2026-12-01T00:00:00Z"})
    }

    #[test]
    fn a_row_shows_the_status_numbers_and_what_is_not_ok() {
        let t = tq(json!({"pending": 40, "inFlight": 8, "desiredReplicas": 4, "readyReplicas": 3,
            "lastScaleReason": "scaled up 1 -> 4: 40 pending / 2 per replica = 20, clamped to maxReplicas 4",
            "conditions": [cond("Ready", "True", "Ready"), cond("BrokerReachable", "True", "Read"),
                cond("ScalingLimited", "True", "AtMaxReplicas"), cond("QueueShared", "False", "Alone")]}));
        let r = row(&t, Some(true));
        assert_eq!(
            (r.pending, r.in_flight, r.desired_replicas, r.ready_replicas),
            (Some(40), Some(8), Some(4), Some(3))
        );
        assert_eq!((r.min_replicas, r.max_replicas, r.mode, r.state), (0, 4, Some("push"), "atMax"));
        assert_eq!(r.queues, ["ai", "ai_low"]);
        assert_eq!(r.not_ok.iter().map(|n| n.condition.as_str()).collect::<Vec<_>>(), ["ScalingLimited"]);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["desiredReplicas"], 4);
        assert_eq!(v["notOk"][0]["message"], "ScalingLimited says AtMaxReplicas");

        let down = tq(
            json!({"conditions": [cond("BrokerReachable", "False", "BrokerUnreachable"), cond("Paused", "True", "Paused")]}),
        );
        assert_eq!(row(&down, None).state, "brokerDown");
        let paused =
            tq(json!({"conditions": [cond("BrokerReachable", "True", "Read"), cond("Paused", "True", "Paused")]}));
        assert_eq!(row(&paused, Some(false)).state, "paused");
        assert_eq!(row(&paused, Some(false)).mode, Some("poll"));
        let limited =
            tq(json!({"conditions": [cond("Ready", "True", "Ready"), cond("ScalingLimited", "True", "Limited")]}));
        assert_eq!(row(&limited, None).state, "limited");
        let routes = tq(
            json!({"conditions": [cond("Ready", "True", "Ready"), cond("RoutesAccepted", "False", "RouteConflict")]}),
        );
        assert_eq!(row(&routes, None).state, "problem");
        assert_eq!(row(&tq(json!({})), None).state, "new");
    }

    #[test]
    fn backed_up_pools_come_first() {
        let rows = ["calm", "busy", "capped", "idle"].map(|name| {
            let (pending, limited) = match name {
                "busy" => (30, "Limited"),
                "capped" => (12, "AtMaxReplicas"),
                "calm" => (2, "Limited"),
                _ => (0, "Limited"),
            };
            let mut t = tq(json!({"pending": pending, "conditions": [cond("ScalingLimited", "True", limited)]}));
            t.metadata.name = Some(name.into());
            row(&t, None)
        });
        let view = View::starting().with_rows(rows.into());
        let names: Vec<&str> = view.task_queues.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["capped", "busy", "calm", "idle"], "at its cap with work waiting, then by pending");
    }

    #[test]
    fn a_standby_says_so_and_names_the_leader_instead_of_showing_numbers() {
        let d = Dashboard::default();
        assert_eq!(d.api(None, DEFAULT_LIMIT).role, "starting", "before the controller runs");
        let (store, mut writer) = kube::runtime::reflector::store::<TaskQueue>();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(tq(json!({"pending": 3}))));
        let (leading_tx, leading) = watch::channel(false);
        let holder = Arc::new(RwLock::new(Some("taskqueue-operator-7d9f-abcde".to_string())));
        let broker = Arc::new(BrokerState::new(Duration::from_secs(1)));
        d.connect(Source { store, broker, leading, holder });
        d.record("prod", "ai", sample(1, 3, 1), None);
        let standby = d.api(None, DEFAULT_LIMIT);
        assert_eq!((standby.role, standby.leader.as_deref()), ("standby", Some("taskqueue-operator-7d9f-abcde")));
        assert!(standby.task_queues.is_empty(), "no stale numbers on a standby");
        leading_tx.send_replace(true);
        let leader = d.api(Some("prod"), DEFAULT_LIMIT);
        assert_eq!((leader.role, leader.task_queues.len()), ("leader", 1));
        assert_eq!(leader.task_queues[0].pending, Some(3));
        assert_eq!(leader.task_queues[0].history.samples.len(), 1);
        assert!(d.api(Some("other"), DEFAULT_LIMIT).task_queues.is_empty(), "the namespace filter");
        assert_eq!(leader.namespaces, ["prod"]);
        let cut = d.api(None, 0);
        assert_eq!((cut.total, cut.waiting, cut.task_queues.len()), (1, 1, 0), "limit cuts rows, not the counts");
    }

    #[test]
    fn the_page_is_one_file_with_no_external_asset() {
        assert!(PAGE.contains("/api/taskqueues"));
        // The SVG namespace is a name, not an address anything is loaded from.
        let page = PAGE.replace("\"http://www.w3.org/2000/svg\"", "");
        for external in ["http://", "https://", "//cdn", "<link ", "src=", "@import", "url("] {
            assert!(!page.contains(external), "the page must not load anything ({external})");
        }
    }
}
