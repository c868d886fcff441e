//! The broker poller: every tick, one pipelined read per broker for all TaskQueues using it.
//!
//! Reconciles register what they need to read (a [`Target`]); the poller groups targets by broker
//! endpoint, reads each broker once per its shortest poll interval, stores a [`Reading`] per
//! TaskQueue and wakes the reconciler for those whose reading changed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::mpsc::UnboundedSender;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::{Mutex, Notify};

use crate::broker::heartbeat::{self, SharedWorkers};
use crate::broker::reader::read_depths;
use crate::broker::{BrokerEndpoint, BrokerPool, DepthQuery, QueueDepth, ReadError};
use crate::crd::TaskQueue;
use crate::metrics::{Metrics, ResultLabels};

pub type Key = ObjectRef<TaskQueue>;
pub type Depths = Result<Vec<Result<QueueDepth, ReadError>>, ReadError>;

/// What one TaskQueue needs read.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub endpoint: BrokerEndpoint,
    pub queries: Vec<DepthQuery>,
    pub interval: Duration,
}

/// The latest read for one TaskQueue: one entry per query of its target, in order.
#[derive(Clone, Debug)]
pub struct Reading {
    pub endpoint: BrokerEndpoint,
    pub queries: Vec<DepthQuery>,
    pub depths: Depths,
}

impl Reading {
    /// A reading only answers the target it was taken for (not one from before a spec change).
    pub fn matches(&self, target: &Target) -> bool {
        self.endpoint == target.endpoint && self.queries == target.queries
    }
}

/// The live workers of one (broker, prefix), and the task keeping them current.
type Subscription = (SharedWorkers, tokio::task::JoinHandle<()>);

pub struct BrokerState {
    targets: Mutex<HashMap<Key, Target>>,
    readings: Mutex<HashMap<Key, Reading>>,
    pool: BrokerPool,
    /// One worker-heartbeat subscription per (broker, key prefix) in use.
    heartbeats: std::sync::Mutex<HashMap<(BrokerEndpoint, String), Subscription>>,
    wake: Notify,
    /// Round trips done so far (for tests and benchmarks).
    pub round_trips: std::sync::atomic::AtomicU64,
    metrics: Arc<Metrics>,
}

impl BrokerState {
    pub fn new(timeout: Duration) -> Self {
        Self::with_metrics(timeout, Arc::default())
    }

    pub fn with_metrics(timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            targets: Mutex::default(),
            readings: Mutex::default(),
            pool: BrokerPool::new(timeout),
            heartbeats: Default::default(),
            wake: Notify::new(),
            round_trips: Default::default(),
        }
    }

    pub async fn register(&self, key: Key, target: Target) {
        let changed = self.targets.lock().await.insert(key, target.clone()).as_ref() != Some(&target);
        if changed {
            self.wake.notify_one();
        }
    }

    pub async fn unregister(&self, key: &Key) {
        self.targets.lock().await.remove(key);
        self.readings.lock().await.remove(key);
    }

    pub async fn reading(&self, key: &Key) -> Option<Reading> {
        self.readings.lock().await.get(key).cloned()
    }

    /// The live workers seen on the broker of a registered TaskQueue (by heartbeat).
    pub async fn workers(&self, key: &Key) -> Option<SharedWorkers> {
        let target = self.targets.lock().await.get(key).cloned()?;
        let prefix = target.queries.first()?.prefix.clone();
        self.heartbeats.lock().expect("lock").get(&(target.endpoint, prefix)).map(|(w, _)| w.clone())
    }

    /// Start subscriptions for new (broker, prefix) pairs and stop unused ones.
    fn sync_heartbeats(&self, targets: &HashMap<Key, Target>) {
        let want: std::collections::HashSet<(BrokerEndpoint, String)> =
            targets.values().flat_map(|t| t.queries.iter().map(|q| (t.endpoint.clone(), q.prefix.clone()))).collect();
        let mut subs = self.heartbeats.lock().expect("lock");
        subs.retain(|k, (_, task)| {
            let keep = want.contains(k);
            if !keep {
                task.abort();
            }
            keep
        });
        for (endpoint, prefix) in want {
            subs.entry((endpoint.clone(), prefix.clone())).or_insert_with(|| {
                let workers = SharedWorkers::default();
                let timeout = self.pool.timeout.unwrap_or(Duration::from_secs(5));
                let task = tokio::spawn(heartbeat::subscribe(endpoint, vec![prefix], workers.clone(), timeout));
                (workers, task)
            });
        }
    }

    /// Forget TaskQueues that no longer exist (reconcile is not called for deleted objects).
    async fn prune(&self, store: &Store<TaskQueue>) {
        let mut targets = self.targets.lock().await;
        let before = targets.len();
        targets.retain(|k, _| store.get(k).is_some());
        if targets.len() != before {
            let live: std::collections::HashSet<Key> = targets.keys().cloned().collect();
            self.readings.lock().await.retain(|k, _| live.contains(k));
        }
    }

    /// Read every broker in `groups` once (concurrently); store per-TaskQueue readings and
    /// return the TaskQueues whose reading changed, and the brokers that could not be read.
    async fn read_groups(&self, groups: Vec<(BrokerEndpoint, Vec<(Key, Target)>)>) -> (Vec<Key>, Vec<BrokerEndpoint>) {
        let reads = groups.into_iter().map(|(endpoint, members)| async move {
            let queries: Vec<DepthQuery> = members
                .iter()
                .flat_map(|(_, t)| t.queries.iter().cloned())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let result = self.read_one(&endpoint, &queries).await;
            (endpoint, members, queries, result)
        });
        let results = futures::future::join_all(reads).await;
        let mut changed = Vec::new();
        let mut failed = Vec::new();
        let mut readings = self.readings.lock().await;
        for (endpoint, members, queries, result) in results {
            if result.is_err() {
                failed.push(endpoint.clone());
            }
            for (key, target) in members {
                let depths = match &result {
                    Err(e) => Err(e.clone()),
                    Ok(all) => Ok(target
                        .queries
                        .iter()
                        .map(|q| {
                            queries
                                .binary_search(q)
                                .map(|i| all[i].clone())
                                .unwrap_or_else(|_| Ok(QueueDepth::default()))
                        })
                        .collect()),
                };
                let reading = Reading { endpoint: endpoint.clone(), queries: target.queries.clone(), depths };
                let same = readings.get(&key).is_some_and(|old| old.matches(&target) && old.depths == reading.depths);
                readings.insert(key.clone(), reading);
                if !same {
                    changed.push(key);
                }
            }
        }
        (changed, failed)
    }

    async fn read_one(&self, endpoint: &BrokerEndpoint, queries: &[DepthQuery]) -> Depths {
        let started = Instant::now();
        let result = self.connect_and_read(endpoint, queries).await;
        self.metrics.broker_read_seconds.observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(_) => "ok",
            Err(e) => e.reason(),
        };
        self.metrics.broker_reads.get_or_create(&ResultLabels { result: label.into() }).inc();
        if result.is_err() {
            // Dial afresh next time rather than trusting a connection that just failed.
            self.pool.forget(endpoint).await;
        }
        result
    }

    async fn connect_and_read(&self, endpoint: &BrokerEndpoint, queries: &[DepthQuery]) -> Depths {
        let shown = endpoint.to_string();
        let mut conn = self.pool.connection(endpoint).await?;
        self.round_trips.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let timeout = self.pool.timeout.unwrap_or(Duration::from_secs(5));
        match tokio::time::timeout(timeout, read_depths(&mut conn, &shown, queries)).await {
            Ok(r) => r,
            Err(_) => Err(ReadError::Unreachable { endpoint: shown, cause: format!("no reply within {timeout:?}") }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_brokers_are_read_less_often_up_to_a_cap() {
        let ms = Duration::from_millis;
        let got: Vec<Duration> = (0..6).map(|f| read_interval(ms(500), f)).collect();
        assert_eq!(got, [ms(500), ms(1000), ms(2000), ms(4000), ms(5000), ms(5000)]);
        assert_eq!(read_interval(Duration::from_secs(30), 3), Duration::from_secs(30), "never below pollInterval");
        assert_eq!(read_interval(ms(100), 40), MAX_BACKOFF);
    }
}

impl Drop for BrokerState {
    fn drop(&mut self) {
        for (_, task) in self.heartbeats.lock().expect("lock").values() {
            task.abort();
        }
    }
}

/// How long a wake-up for new targets waits for more of them.
const WAKE_DEBOUNCE: Duration = Duration::from_millis(100);

/// Run forever: read due brokers, wake reconciles whose reading changed.
pub async fn run(state: Arc<BrokerState>, store: Store<TaskQueue>, trigger: UnboundedSender<Key>) {
    let mut schedule = Schedule::default();
    loop {
        state.prune(&store).await;
        let (changed, next_wake) = state.poll_due(&mut schedule, Instant::now()).await;
        for key in changed {
            if trigger.unbounded_send(key).is_err() {
                return; // controller stopped
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next_wake.into()) => {}
            _ = state.wake.notified() => {
                // New targets come in bursts (startup, a big apply): gather them, since every
                // pass walks all targets.
                tokio::time::sleep(WAKE_DEBOUNCE).await;
            }
        }
    }
}

/// When each broker was last read, and how many reads in a row failed.
#[derive(Default)]
pub struct Schedule {
    last_read: HashMap<BrokerEndpoint, Instant>,
    failures: HashMap<BrokerEndpoint, u32>,
}

/// The longest wait between reads of a failing broker: recovery is noticed within this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Time between reads: the poll interval, doubled per failed read in a row up to
/// [`MAX_BACKOFF`] (never below the poll interval itself).
pub fn read_interval(poll: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return poll;
    }
    poll.saturating_mul(1 << failures.min(16)).min(MAX_BACKOFF.max(poll))
}

impl BrokerState {
    /// One tick: read every broker whose shortest poll interval has elapsed (one pipelined round
    /// trip each, shared by all its TaskQueues). Returns the TaskQueues whose reading changed and
    /// when the next broker falls due.
    pub async fn poll_due(&self, schedule: &mut Schedule, now: Instant) -> (Vec<Key>, Instant) {
        let mut groups: HashMap<BrokerEndpoint, (Duration, Vec<(Key, Target)>)> = HashMap::new();
        {
            let targets = self.targets.lock().await;
            self.sync_heartbeats(&targets);
            for (key, target) in targets.iter() {
                let g = groups.entry(target.endpoint.clone()).or_insert((target.interval, Vec::new()));
                g.0 = g.0.min(target.interval);
                g.1.push((key.clone(), target.clone()));
            }
        }
        let live: usize =
            self.heartbeats.lock().expect("lock").values().map(|(w, _)| w.lock().expect("lock").live(now)).sum();
        self.metrics.live_workers.set(i64::try_from(live).unwrap_or(i64::MAX));
        schedule.last_read.retain(|e, _| groups.contains_key(e));
        schedule.failures.retain(|e, _| groups.contains_key(e));
        let mut due = Vec::new();
        let mut next_wake = now + Duration::from_secs(1);
        for (endpoint, (poll, members)) in groups {
            let interval = read_interval(poll, schedule.failures.get(&endpoint).copied().unwrap_or(0));
            let next = schedule.last_read.get(&endpoint).map_or(now, |t| *t + interval);
            if next <= now {
                schedule.last_read.insert(endpoint.clone(), now);
                next_wake = next_wake.min(now + interval);
                due.push((endpoint, members));
            } else {
                next_wake = next_wake.min(next);
            }
        }
        if due.is_empty() {
            return (Vec::new(), next_wake);
        }
        let read: Vec<BrokerEndpoint> = due.iter().map(|(e, _)| e.clone()).collect();
        let (changed, failed) = self.read_groups(due).await;
        for endpoint in read {
            if failed.contains(&endpoint) {
                *schedule.failures.entry(endpoint).or_default() += 1;
            } else {
                schedule.failures.remove(&endpoint);
            }
        }
        (changed, next_wake)
    }
}
