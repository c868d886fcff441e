//! Prometheus metrics, served on `/metrics` (see `http.rs`).
//!
//! Per TaskQueue: what the broker holds and what the operator decided. For the operator: reconciles,
//! broker reads (count and latency), API writes by kind (a steady state should add none), scale
//! events, live Celery workers seen through heartbeats, and readiness.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskQueueLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabels {
    pub namespace: String,
    pub name: String,
    /// `up` or `down`.
    pub direction: String,
}

/// A condition of a TaskQueue that is not OK (see `report::not_ok`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotOkLabels {
    pub namespace: String,
    pub name: String,
    pub condition: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok`, or the failure's reason.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// What was written: `deployment`, `status`, `event`, `pod`, `configmap`.
    pub kind: String,
}

/// The kinds of object the operator writes (`taskqueue_api_writes_total{kind}`).
pub const WRITE_KINDS: [&str; 5] = ["deployment", "status", "event", "configmap", "pod"];

/// How a reconcile ends (`taskqueue_reconciles_total{result}`); a panic is caught and counted.
pub const RECONCILE_RESULTS: [&str; 4] = ["ok", "error", "panicked", "controller_error"];

pub struct Metrics {
    registry: Registry,
    pub pending: Family<TaskQueueLabels, Gauge>,
    pub in_flight: Family<TaskQueueLabels, Gauge>,
    pub scheduled: Family<TaskQueueLabels, Gauge>,
    pub orphaned: Family<TaskQueueLabels, Gauge>,
    pub desired_replicas: Family<TaskQueueLabels, Gauge>,
    pub ready_replicas: Family<TaskQueueLabels, Gauge>,
    pub broker_up: Family<TaskQueueLabels, Gauge>,
    /// Per TaskQueue: 1 when its broker reacts by push (list-push notifications), 0 when it is
    /// polled. Per TaskQueue, not per broker: a broker's address is no label.
    pub broker_push: Family<TaskQueueLabels, Gauge>,
    pub paused: Family<TaskQueueLabels, Gauge>,
    /// 1 per condition that is not OK; no series while all are (the alerts' input, and cheap:
    /// a healthy TaskQueue costs no series here).
    pub not_ok: Family<NotOkLabels, Gauge>,
    /// The `not_ok` series of each TaskQueue, to remove those that are OK again.
    not_ok_shown: std::sync::Mutex<std::collections::HashMap<(String, String), Vec<NotOkLabels>>>,
    pub scale_events: Family<ScaleLabels, Counter>,
    pub reconciles: Family<ResultLabels, Counter>,
    pub broker_reads: Family<ResultLabels, Counter>,
    pub broker_read_seconds: Histogram,
    /// Bytes received from brokers (reads, unacked messages, heartbeats).
    pub broker_received_bytes: Counter,
    /// Held messages beyond the tags a poll reads (100 000 per broker and key prefix).
    pub unacked_unlisted: Gauge,
    pub api_writes: Family<WriteLabels, Counter>,
    pub live_workers: Gauge,
    /// 1 on the replica holding the leader Lease, 0 on a standby.
    pub leader: Gauge,
    ready: AtomicBool,
    ready_gauge: Gauge,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("taskqueue");
        let m = Self {
            pending: Family::default(),
            in_flight: Family::default(),
            scheduled: Family::default(),
            orphaned: Family::default(),
            desired_replicas: Family::default(),
            ready_replicas: Family::default(),
            broker_up: Family::default(),
            broker_push: Family::default(),
            paused: Family::default(),
            scale_events: Family::default(),
            reconciles: Family::default(),
            broker_reads: Family::default(),
            // 0.5 ms .. about 4 s.
            broker_read_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            broker_received_bytes: Counter::default(),
            unacked_unlisted: Gauge::default(),
            api_writes: Family::default(),
            live_workers: Gauge::default(),
            leader: Gauge::default(),
            not_ok: Family::default(),
            not_ok_shown: Default::default(),
            ready: AtomicBool::new(false),
            ready_gauge: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("pending", "Messages waiting in Redis that the pool counts", m.pending.clone());
        registry.register(
            "in_flight",
            "Unacked messages the pool counts (ETA tasks only within etaHorizon)",
            m.in_flight.clone(),
        );
        registry.register(
            "scheduled",
            "Unacked ETA/countdown messages due beyond etaHorizon (not demand)",
            m.scheduled.clone(),
        );
        registry.register(
            "orphaned",
            "Unacked messages no live worker can be holding (their worker died; restored after visibility_timeout)",
            m.orphaned.clone(),
        );
        registry.register("desired_replicas", "Replicas the operator decided", m.desired_replicas.clone());
        registry.register("ready_replicas", "Ready worker pods of the pool", m.ready_replicas.clone());
        registry.register("broker_up", "1 when the pool's broker was read at the last poll", m.broker_up.clone());
        registry.register(
            "broker_push",
            "1 when the pool's broker sends list-push notifications (push reaction), 0 when it is only polled",
            m.broker_push.clone(),
        );
        registry.register("paused", "1 while the pool is paused by annotation", m.paused.clone());
        registry.register(
            "not_ok",
            "1 for each condition of a TaskQueue that is not OK (condition and reason as labels); none while all are",
            m.not_ok.clone(),
        );
        registry.register("scale_events", "Replica changes made by the operator", m.scale_events.clone());
        registry.register("reconciles", "Reconciles by result", m.reconciles.clone());
        registry.register("broker_reads", "Pipelined broker reads (one per broker per tick)", m.broker_reads.clone());
        registry.register("broker_read_seconds", "Time of one pipelined broker read", m.broker_read_seconds.clone());
        registry.register(
            "broker_received_bytes",
            "Bytes received from brokers: list lengths, delivery tags, each unacked message once, heartbeats",
            m.broker_received_bytes.clone(),
        );
        registry.register(
            "broker_unacked_unlisted",
            "Held (unacked) messages beyond the 100 000 delivery tags a poll reads per broker and key prefix: in no inFlight",
            m.unacked_unlisted.clone(),
        );
        registry.register("api_writes", "Kubernetes API writes by kind of object", m.api_writes.clone());
        // Every kind at 0 from the start: a replica that never wrote (a standby) says so, and
        // rate() has a first sample.
        for kind in WRITE_KINDS {
            drop(m.api_writes.get_or_create(&WriteLabels { kind: kind.into() }));
        }
        for result in RECONCILE_RESULTS {
            drop(m.reconciles.get_or_create(&ResultLabels { result: result.into() }));
        }
        registry.register(
            "live_workers",
            "Celery workers alive by heartbeat, over all brokers",
            m.live_workers.clone(),
        );
        registry.register("leader", "1 on the replica holding the leader Lease, 0 on a standby", m.leader.clone());
        registry.register("operator_ready", "1 once the operator's caches are filled", m.ready_gauge.clone());
        Self { registry, ..m }
    }

    /// Metrics with one series in every family, as a busy operator shows them: a family with
    /// no series is not rendered at all, so this is what dashboards and alerts are checked
    /// against.
    pub fn example() -> Self {
        let m = Self::new();
        let tq = TaskQueueLabels { namespace: "prod".into(), name: "ai".into() };
        for family in m.per_taskqueue() {
            family.get_or_create(&tq).set(1);
        }
        m.set_not_ok("prod", "ai", &[("ScalingLimited".into(), "AtMaxReplicas".into())]);
        m.scale_events
            .get_or_create(&ScaleLabels { namespace: "prod".into(), name: "ai".into(), direction: "up".into() })
            .inc();
        m.reconciles.get_or_create(&ResultLabels { result: "ok".into() }).inc();
        m.broker_reads.get_or_create(&ResultLabels { result: "ok".into() }).inc();
        m.broker_read_seconds.observe(0.002);
        m.broker_received_bytes.inc_by(100);
        m.write("status");
        m.live_workers.set(1);
        m.leader.set(1);
        m.set_ready();
        m
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// `kind`: one of [`WRITE_KINDS`].
    pub fn write(&self, kind: &str) {
        debug_assert!(WRITE_KINDS.contains(&kind), "{kind} is not in WRITE_KINDS");
        self.api_writes.get_or_create(&WriteLabels { kind: kind.into() }).inc();
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
        self.ready_gauge.set(1);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Show exactly these (condition, reason) pairs as not OK for one TaskQueue.
    pub fn set_not_ok(&self, namespace: &str, name: &str, now: &[(String, String)]) {
        let labels: Vec<NotOkLabels> = now
            .iter()
            .map(|(condition, reason)| NotOkLabels {
                namespace: namespace.into(),
                name: name.into(),
                condition: condition.clone(),
                reason: reason.clone(),
            })
            .collect();
        let mut shown = self.not_ok_shown.lock().expect("lock");
        let key = (namespace.to_string(), name.to_string());
        for old in shown.get(&key).into_iter().flatten().filter(|l| !labels.contains(l)) {
            self.not_ok.remove(old);
        }
        for l in &labels {
            self.not_ok.get_or_create(l).set(1);
        }
        if labels.is_empty() {
            shown.remove(&key);
        } else {
            shown.insert(key, labels);
        }
    }

    /// The gauges with one series per TaskQueue.
    fn per_taskqueue(&self) -> [&Family<TaskQueueLabels, Gauge>; 9] {
        [
            &self.pending,
            &self.in_flight,
            &self.scheduled,
            &self.orphaned,
            &self.desired_replicas,
            &self.ready_replicas,
            &self.broker_up,
            &self.broker_push,
            &self.paused,
        ]
    }

    /// Drop every per-TaskQueue and per-broker series: a standby reports nothing it no longer
    /// keeps current (a former leader's stale `taskqueue_not_ok` would hold an alert up).
    pub fn forget_all(&self) {
        for family in self.per_taskqueue() {
            family.clear();
        }
        self.scale_events.clear();
        self.not_ok.clear();
        self.not_ok_shown.lock().expect("lock").clear();
    }

    pub fn forget(&self, namespace: &str, name: &str) {
        self.set_not_ok(namespace, name, &[]);
        let l = TaskQueueLabels { namespace: namespace.into(), name: name.into() };
        for family in self.per_taskqueue() {
            family.remove(&l);
        }
        for direction in ["up", "down"] {
            self.scale_events.remove(&ScaleLabels {
                namespace: namespace.into(),
                name: name.into(),
                direction: direction.into(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_drops_every_per_taskqueue_series() {
        let m = Metrics::example();
        m.forget_all();
        let text = m.render();
        for gone in
            ["taskqueue_pending{", "taskqueue_not_ok{", "taskqueue_scale_events_total{", "taskqueue_broker_push{"]
        {
            assert!(!text.contains(gone), "{gone} after forget_all: {text}");
        }
        assert!(text.contains("taskqueue_leader 1"), "process-wide series stay: {text}");
        m.set_not_ok("prod", "ai", &[("ScalingLimited".into(), "AtMaxReplicas".into())]);
        assert!(m.render().contains("taskqueue_not_ok{"), "series come back once set again");
    }

    #[test]
    fn renders_openmetrics_and_forgets_deleted_taskqueues() {
        let m = Metrics::new();
        let l = TaskQueueLabels { namespace: "prod".into(), name: "ai".into() };
        m.pending.get_or_create(&l).set(12);
        m.write("deployment");
        m.set_ready();
        let text = m.render();
        assert!(text.contains("taskqueue_pending{namespace=\"prod\",name=\"ai\"} 12"), "{text}");
        assert!(text.contains("taskqueue_api_writes_total{kind=\"deployment\"} 1"), "{text}");
        assert!(text.contains("taskqueue_api_writes_total{kind=\"event\"} 0"), "every kind from the start: {text}");
        assert!(text.contains("taskqueue_operator_ready 1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
        m.set_not_ok("prod", "ai", &[("BrokerReachable".into(), "BrokerUnreachable".into())]);
        let text = m.render();
        assert!(
            text.contains(
                "taskqueue_not_ok{namespace=\"prod\",name=\"ai\",condition=\"BrokerReachable\",reason=\"BrokerUnreachable\"} 1"
            ),
            "{text}"
        );
        m.set_not_ok("prod", "ai", &[("Ready".into(), "Progressing".into())]);
        let text = m.render();
        assert!(!text.contains("BrokerUnreachable") && text.contains("reason=\"Progressing\""), "{text}");
        m.forget("prod", "ai");
        assert!(!m.render().contains("name=\"ai\""));
    }
}
