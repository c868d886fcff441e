//! The broker poller: one reader task per broker endpoint, each on its own clock.
//!
//! Reconciles register what they need read (a [`Target`]). A supervising loop keeps one reader
//! task per endpoint in use and one worker-heartbeat subscription per (endpoint, key prefix);
//! an endpoint nobody uses any more loses its task, its subscription and its connection. Each
//! reader reads its broker once per the shortest poll interval of its TaskQueues (backing off
//! while it fails) in one pipelined round trip, with one deadline over everything the read does
//! (connecting, Sentinel discovery, the LLENs, the delivery tags, the values of new unacked
//! messages within half of it). It stores a [`Reading`] per
//! TaskQueue as soon as its own read is done and wakes the reconciles whose reading changed. A
//! slow or blackholed broker therefore only ever delays its own TaskQueues.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc::UnboundedSender;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::error;

use super::orphans::{Consumers, Judge};
use crate::broker::heartbeat::{self, PushHook, SharedPush, SharedWorkers};
use crate::broker::keys::Separator;
use crate::broker::reader::{InFlight, ReadPlan};
use crate::broker::resp::Limits;
use crate::broker::unacked::{Streamed, Tags};
use crate::broker::{BrokerEndpoint, BrokerPool, DepthQuery, QueueDepth, ReadError};
use crate::crd::TaskQueue;
use crate::demand::{Consumer, Share};
use crate::metrics::{Metrics, ResultLabels};

pub type Key = ObjectRef<TaskQueue>;
pub type Depths = Result<Vec<Result<QueueDepth, ReadError>>, ReadError>;

/// What one TaskQueue needs read.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub endpoint: BrokerEndpoint,
    /// `spec.queue` first, then `spec.extraQueues`.
    pub queries: Vec<DepthQuery>,
    pub interval: Duration,
    /// Capacity (`maxReplicas × tasksPerReplica`): how a shared queue's demand is split.
    pub weight: i64,
    /// Its workers' pool as their heartbeats name it, `<nodeName>@<Deployment>` (see
    /// `broker::workers`); empty: not judged for orphans.
    pub pool: String,
}

/// What the heartbeats say of one pool (see [`BrokerState::heard`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heard {
    /// Its workers alive by heartbeat.
    pub live: usize,
    /// `<nodeName>@<Deployment>`.
    pub pool: String,
    /// The heartbeat channel listened to.
    pub channel: String,
    /// A queue whose kombu binding was written with another `sep` than the spec's: (queue,
    /// binding key, the separator seen).
    pub other_sep: Option<(String, String, String)>,
    /// Whether a binding of the pool's queues was seen written with the spec's `sep`.
    pub sep_matches: bool,
}

/// The latest read for one TaskQueue: one entry per query of its target, in order.
#[derive(Clone, Debug)]
pub struct Reading {
    /// What was read (shared with the poller's targets).
    pub target: Arc<Target>,
    pub depths: Depths,
    /// Who else in the namespace consumes each queue on this broker, one per query.
    pub shares: Arc<[Share]>,
    /// Whether the broker notifies list pushes (see `push_mode`): part of the reading, so a
    /// change of mode reaches the status like a change of depth.
    pub push: bool,
    /// When the read started.
    pub at: Instant,
}

impl Reading {
    /// A reading only answers the target it was taken for (not one from before a spec change).
    pub fn matches(&self, target: &Target) -> bool {
        self.target.endpoint == target.endpoint && self.target.queries == target.queries
    }
}

/// A Redis server and database, whatever URL reached it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Server {
    addr: std::net::SocketAddr,
    db: i64,
}

/// A (broker, key prefix) pair: one heartbeat subscription each.
type SubscriptionKey = (BrokerEndpoint, String);

/// The live workers of one (broker, prefix), what it knows of push notifications, and the task
/// keeping them current.
type Subscription = (SharedWorkers, SharedPush, JoinHandle<()>);

/// The reader task of one endpoint, and how to make it read early.
struct Reader {
    task: JoinHandle<()>,
    wakes: Arc<Wakes>,
}

/// Targets grouped by endpoint (each reader walks only its own).
#[derive(Default)]
struct Targets {
    by_endpoint: HashMap<BrokerEndpoint, HashMap<Key, Arc<Target>>>,
    /// Each TaskQueue's target (the same allocation as in `by_endpoint`).
    target_of: HashMap<Key, Arc<Target>>,
    /// The list keys of each endpoint's queues, with how many targets read each: a push to
    /// one of them wakes its reader. Kept by counting, not rebuilt: a rebuild per change cost
    /// O(n²) while 10 000 TaskQueues registered.
    watched: HashMap<BrokerEndpoint, HashMap<Vec<u8>, usize>>,
    /// Bumped on every change: what is derived from the targets (a reader's query list, the
    /// subscriptions wanted) is rebuilt only when it moved, not on every read or pass.
    version: u64,
}

impl Targets {
    /// Insert or replace; true when it changed.
    fn insert(&mut self, key: Key, target: Target) -> bool {
        if self.target_of.get(&key).is_some_and(|t| t.endpoint != target.endpoint) {
            self.remove(&key);
        }
        let group = self.by_endpoint.entry(target.endpoint.clone()).or_default();
        if group.get(&key).is_some_and(|t| **t == target) {
            return false;
        }
        let target = Arc::new(target);
        self.target_of.insert(key.clone(), target.clone());
        self.version += 1;
        if let Some(old) = group.insert(key, target.clone()) {
            self.unwatch(&old);
        }
        let watched = self.watched.entry(target.endpoint.clone()).or_default();
        for k in list_keys(&target) {
            *watched.entry(k).or_default() += 1;
        }
        true
    }

    fn remove(&mut self, key: &Key) {
        let Some(target) = self.target_of.remove(key) else { return };
        let endpoint = &target.endpoint;
        self.version += 1;
        let Some(group) = self.by_endpoint.get_mut(endpoint) else { return };
        let old = group.remove(key);
        if group.is_empty() {
            self.by_endpoint.remove(endpoint);
        }
        if let Some(old) = old {
            self.unwatch(&old);
        }
    }

    fn unwatch(&mut self, old: &Target) {
        let Some(watched) = self.watched.get_mut(&old.endpoint) else { return };
        for k in list_keys(old) {
            if let Some(n) = watched.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    watched.remove(&k);
                }
            }
        }
        if watched.is_empty() {
            self.watched.remove(&old.endpoint);
        }
    }
}

/// The Redis lists a target reads (every priority list of each queue).
fn list_keys(target: &Target) -> impl Iterator<Item = Vec<u8>> + '_ {
    target.queries.iter().flat_map(|q| q.keys().into_iter().map(|(_, k)| k))
}

pub struct BrokerState {
    targets: Mutex<Targets>,
    readings: Mutex<HashMap<Key, Reading>>,
    pool: BrokerPool,
    /// The whole of one broker read must finish within this.
    deadline: Duration,
    readers: Mutex<HashMap<BrokerEndpoint, Reader>>,
    /// One worker-heartbeat subscription per (broker, key prefix) in use.
    heartbeats: Mutex<HashMap<SubscriptionKey, Subscription>>,
    /// A new endpoint appeared: the supervisor starts its reader.
    wake: Notify,
    /// Per endpoint: when `notify-keyspace-events` was last asked, and what it said (None: the
    /// user may not ask).
    push_config: Mutex<HashMap<BrokerEndpoint, (Instant, Option<bool>)>>,
    /// Per endpoint, a few members of each queue's kombu binding set (`binding_key`), read with
    /// the push configuration: which `sep` the app writes.
    bindings: Mutex<HashMap<BrokerEndpoint, BindingSamples>>,
    /// Per endpoint, the unacked messages seen so far (each value is read once) and the
    /// connection their values are read on.
    unacked: Mutex<HashMap<BrokerEndpoint, (Tags, Streamed)>>,
    /// Per endpoint, the Redis server its connection reached: socket address (names resolved)
    /// and database. Endpoints on one server share their queues (see `shares`).
    servers: Mutex<HashMap<BrokerEndpoint, Server>>,
    /// Per endpoint, what its reads are built from (see `Prepared`).
    prepared: Mutex<HashMap<BrokerEndpoint, Arc<Prepared>>>,
    /// The (broker, prefix) pairs in use, at a targets version.
    wanted_subscriptions: Mutex<(Option<u64>, HashSet<SubscriptionKey>)>,
    /// Round trips done so far (for tests and benchmarks).
    pub round_trips: AtomicU64,
    metrics: Arc<Metrics>,
}

impl BrokerState {
    pub fn new(timeout: Duration) -> Self {
        Self::with_metrics(timeout, Limits::default(), Arc::default())
    }

    pub fn with_metrics(timeout: Duration, limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            pool: BrokerPool::with_limits(timeout, limits, metrics.broker_received_bytes.clone()),
            metrics,
            targets: Mutex::default(),
            readings: Mutex::default(),
            deadline: timeout,
            readers: Mutex::default(),
            heartbeats: Mutex::default(),
            push_config: Mutex::default(),
            bindings: Mutex::default(),
            prepared: Mutex::default(),
            servers: Mutex::default(),
            unacked: Mutex::default(),
            wanted_subscriptions: Mutex::default(),
            wake: Notify::new(),
            round_trips: AtomicU64::default(),
        }
    }

    pub fn register(&self, key: Key, target: Target) {
        let endpoint = target.endpoint.clone();
        let changed = self.targets.lock().expect("lock").insert(key, target);
        if !changed {
            return;
        }
        match self.readers.lock().expect("lock").get(&endpoint) {
            Some(r) => r.wakes.new_target.notify_one(),
            None => self.wake.notify_one(),
        }
    }

    pub fn unregister(&self, key: &Key) {
        self.targets.lock().expect("lock").remove(key);
        self.readings.lock().expect("lock").remove(key);
    }

    /// Forget every target (a standby reads no broker): readers and subscriptions stop at the
    /// supervisor's next pass.
    pub fn unregister_all(&self) {
        let mut targets = self.targets.lock().expect("lock");
        // The version keeps counting up: what was derived from the old targets must not match.
        *targets = Targets { version: targets.version + 1, ..Targets::default() };
        drop(targets);
        self.readings.lock().expect("lock").clear();
    }

    pub fn reading(&self, key: &Key) -> Option<Reading> {
        let mut reading = self.readings.lock().expect("lock").get(key).cloned()?;
        // A read that changed nothing leaves the readings as they were: the time of the
        // endpoint's last read is theirs too.
        let prepared = self.prepared.lock().expect("lock").get(&reading.target.endpoint).cloned();
        if let Some(last) = prepared.as_ref().and_then(|p| p.last.lock().expect("lock").as_ref().map(|l| l.at)) {
            reading.at = reading.at.max(last);
        }
        Some(reading)
    }

    /// Whether the workers of a registered TaskQueue's pool are heard: how many are alive by
    /// heartbeat and the channel listened to; None until the subscription has listened for
    /// two heartbeat intervals.
    pub fn heard(&self, key: &Key, now: Instant) -> Option<Heard> {
        let target = self.target(key)?;
        let workers = self.workers_of(&target)?;
        let live = workers.lock().expect("lock").live_in_pool(&target.pool, now, Duration::from_secs(10))?;
        let prefix = &target.queries.first()?.prefix;
        let channel = crate::broker::heartbeat::channels(prefix, target.endpoint.db).swap_remove(1);
        let (mut other_sep, mut sep_matches) = (None, false);
        if let Some(bindings) = self.bindings.lock().expect("lock").get(&target.endpoint) {
            for q in &target.queries {
                let key = q.binding_key();
                let members = bindings.get(&key).map_or(&[][..], Vec::as_slice);
                match q.separator_seen(members) {
                    Separator::Matches => sep_matches = true,
                    Separator::Other(sep) if other_sep.is_none() => other_sep = Some((q.queue.clone(), key, sep)),
                    _ => {}
                }
            }
        }
        Some(Heard { live, pool: target.pool.clone(), channel, other_sep, sep_matches })
    }

    /// The live workers seen on the broker of a registered TaskQueue (by heartbeat).
    pub fn workers(&self, key: &Key) -> Option<SharedWorkers> {
        self.workers_of(&*self.target(key)?)
    }

    fn target(&self, key: &Key) -> Option<Arc<Target>> {
        self.targets.lock().expect("lock").target_of.get(key).cloned()
    }

    /// The heartbeat subscription's workers for `target`'s broker and key prefix.
    fn workers_of(&self, target: &Target) -> Option<SharedWorkers> {
        let subscription = (target.endpoint.clone(), target.queries.first()?.prefix.clone());
        self.heartbeats.lock().expect("lock").get(&subscription).map(|(w, _, _)| w.clone())
    }

    /// The broker notified a push to `key`: when it is one of our queues, read that broker now.
    pub fn pushed(&self, endpoint: &BrokerEndpoint, key: &[u8]) {
        let ours = self.targets.lock().expect("lock").watched.get(endpoint).is_some_and(|keys| keys.contains_key(key));
        if ours {
            if let Some(r) = self.readers.lock().expect("lock").get(endpoint) {
                r.wakes.push.notify_one();
            }
        }
    }

    /// Whether `endpoint` reacts by push: its broker sends list-push notifications (configured,
    /// or one arrived within the last 10 minutes). Otherwise its TaskQueues wait for the poll.
    pub fn push_mode(&self, endpoint: &BrokerEndpoint) -> bool {
        let now = Instant::now();
        let configured = self.push_config.lock().expect("lock").get(endpoint).and_then(|(_, c)| *c);
        let subs = self.heartbeats.lock().expect("lock");
        let seen = subs.iter().filter(|((e, _), _)| e == endpoint).any(|(_, (_, push, _))| {
            let last = *push.lock().expect("lock");
            last.is_some_and(|t| now.saturating_duration_since(t) < PUSH_SEEN)
        });
        configured == Some(true) || seen
    }

    /// Whether the broker of a registered TaskQueue reacts by push (None: not registered).
    pub fn push_mode_of(&self, key: &Key) -> Option<bool> {
        let endpoint = self.targets.lock().expect("lock").target_of.get(key)?.endpoint.clone();
        Some(self.push_mode(&endpoint))
    }

    /// Endpoints in use.
    pub fn endpoints(&self) -> Vec<BrokerEndpoint> {
        self.targets.lock().expect("lock").by_endpoint.keys().cloned().collect()
    }

    /// Open broker connections (bounded by the endpoints in use).
    pub async fn connections(&self) -> usize {
        self.pool.len().await
    }

    /// Read one endpoint once for all its TaskQueues: store their readings, return the
    /// TaskQueues whose reading changed and whether the read worked.
    pub async fn read_endpoint(&self, endpoint: &BrokerEndpoint) -> (Vec<Key>, bool) {
        let Some(prepared) = self.prepare(endpoint) else { return (Vec::new(), true) };
        self.read_prepared(endpoint, &prepared).await
    }

    /// `read_endpoint` with the plan at hand (the reader also needs its poll interval).
    async fn read_prepared(&self, endpoint: &BrokerEndpoint, prepared: &Prepared) -> (Vec<Key>, bool) {
        let at = Instant::now();
        let result = self.read_one(endpoint, prepared).await;
        let ok = result.is_ok();
        let push = self.push_mode(endpoint);
        let mut last = prepared.last.lock().expect("lock");
        match last.as_mut() {
            // The usual tick: the same answers as the last read for the same members. Only the
            // time of the read is new (see `reading`); no TaskQueue is looked at.
            Some(l) if l.push == push && l.depths == result => {
                l.at = at;
                (Vec::new(), ok)
            }
            _ => {
                let changed = self.store_readings(prepared, &result, push, at);
                *last = Some(LastRead { depths: result, push, at });
                (changed, ok)
            }
        }
    }

    /// Store each member's part of a read that differs from the last one; return the members
    /// whose reading changed.
    fn store_readings(&self, prepared: &Prepared, result: &Depths, push: bool, at: Instant) -> Vec<Key> {
        let mut changed = Vec::new();
        // Held while storing: a TaskQueue unregistered while the read was under way (lease
        // lost, spec invalid, deleted) gets no reading that nobody would ever prune.
        let targets = self.targets.lock().expect("lock");
        let mut readings = self.readings.lock().expect("lock");
        for (((key, target), index), shares) in prepared.members.iter().zip(&prepared.index).zip(&prepared.shares) {
            if !targets.target_of.get(key).is_some_and(|t| Arc::ptr_eq(t, target)) {
                continue;
            }
            match readings.get_mut(key) {
                // This member's part did not move.
                Some(old)
                    if old.push == push
                        && old.matches(target)
                        && old.shares == *shares
                        && same_depths(&old.depths, result, index) =>
                {
                    old.at = at;
                }
                _ => {
                    let depths = match result {
                        Err(e) => Err(e.clone()),
                        Ok(all) => Ok(index.iter().map(|&i| all[i].clone()).collect()),
                    };
                    let (target, shares) = (target.clone(), shares.clone());
                    readings.insert(key.clone(), Reading { target, depths, shares, push, at });
                    changed.push(key.clone());
                }
            }
        }
        changed
    }

    /// What a read of `endpoint` is built from, rebuilt only after its targets changed (a quiet
    /// tick of 10 000 TaskQueues must not clone and sort 10 000 targets). None: no targets.
    fn prepare(&self, endpoint: &BrokerEndpoint) -> Option<Arc<Prepared>> {
        let (version, members, neighbours) = {
            let targets = self.targets.lock().expect("lock");
            let mut prepared = self.prepared.lock().expect("lock");
            let Some(group) = targets.by_endpoint.get(endpoint) else {
                prepared.remove(endpoint);
                return None;
            };
            if let Some(p) = prepared.get(endpoint).filter(|p| p.version == targets.version) {
                return Some(p.clone());
            }
            let members: Vec<(Key, Arc<Target>)> = group.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
            // The TaskQueues of other URLs for the same Redis server and database.
            let servers = self.servers.lock().expect("lock");
            let neighbours: Vec<(Key, Arc<Target>)> = match servers.get(endpoint) {
                None => Vec::new(),
                Some(server) => servers
                    .iter()
                    .filter(|(e, s)| *e != endpoint && *s == server)
                    .filter_map(|(e, _)| targets.by_endpoint.get(e))
                    .flat_map(|g| g.iter().map(|(k, t)| (k.clone(), t.clone())))
                    .collect(),
            };
            (targets.version, members, neighbours)
        };
        // Built without the locks: registering reconciles and `reading` must not wait for it.
        let p = Arc::new(Prepared::new(version, members, &neighbours));
        self.prepared.lock().expect("lock").insert(endpoint.clone(), p.clone());
        Some(p)
    }

    async fn read_one(&self, endpoint: &BrokerEndpoint, prepared: &Prepared) -> Depths {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.deadline, self.connect_and_read(endpoint, prepared)).await {
            Ok(r) => r,
            Err(_) => Err(ReadError::Unreachable {
                endpoint: endpoint.to_string(),
                cause: format!("no reply within {:?}", self.deadline),
            }),
        };
        let result = match result {
            Err(e) => Err(self.pool.explain(endpoint, e).await),
            ok => ok,
        };
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

    async fn connect_and_read(&self, endpoint: &BrokerEndpoint, prepared: &Prepared) -> Depths {
        let (mut conn, addr) = self.pool.connection_at(endpoint).await?;
        self.note_server(endpoint).await;
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        // One reader per endpoint: its tags and value connection are taken for the read and put
        // back after it (a read cut short by its deadline loses them: the next one starts over).
        let kept = self.unacked.lock().expect("lock").remove(endpoint);
        let (mut tags, mut bodies) = match kept {
            Some((tags, bodies)) if bodies.addr == addr => (tags, bodies),
            kept => {
                let bodies = Streamed::new(endpoint.clone(), addr, self.deadline, self.pool.read_bytes.clone());
                (kept.map(|(t, _)| t).unwrap_or_default(), bodies)
            }
        };
        let judge = self.judge(endpoint, &prepared.consumers);
        let in_flight =
            InFlight { tags: &mut tags, bodies: Some(&mut bodies), budget: self.deadline / 2, holders: Some(&judge) };
        let depths = prepared.plan.read(&mut conn, &endpoint.to_string(), in_flight).await;
        let unlisted = {
            let mut unacked = self.unacked.lock().expect("lock");
            unacked.insert(endpoint.clone(), (tags, bodies));
            unacked.values().map(|(t, _)| t.unlisted()).sum()
        };
        self.metrics.unacked_unlisted.set(unlisted);
        // Whether the broker notifies pushes: asked on the same connection, once a minute.
        let due =
            self.push_config.lock().expect("lock").get(endpoint).is_none_or(|(at, _)| at.elapsed() >= CONFIG_EVERY);
        if depths.is_ok() && due {
            let configured = heartbeat::notifications_configured(&mut conn).await;
            self.push_config.lock().expect("lock").insert(endpoint.clone(), (Instant::now(), configured));
            let bindings = read_bindings(&mut conn, prepared.plan.queries()).await;
            self.bindings.lock().expect("lock").insert(endpoint.clone(), bindings);
        }
        depths
    }

    /// Note which server `endpoint` reached; a new one rebuilds every endpoint's shares (their
    /// next reads count a queue two URLs of one Redis share once).
    async fn note_server(&self, endpoint: &BrokerEndpoint) {
        let Some(peer) = self.pool.peer(endpoint).await else { return };
        let server = Server { addr: peer, db: endpoint.db };
        let known = self.servers.lock().expect("lock").insert(endpoint.clone(), server);
        if known != Some(server) {
            self.targets.lock().expect("lock").version += 1;
        }
    }

    /// Who may hold the messages of `endpoint`'s queues: its consumers and live workers now.
    fn judge(&self, endpoint: &BrokerEndpoint, consumers: &Consumers) -> Judge {
        let workers: HashMap<String, SharedWorkers> = {
            let subs = self.heartbeats.lock().expect("lock");
            subs.iter().filter(|((e, _), _)| e == endpoint).map(|((_, p), (w, _, _))| (p.clone(), w.clone())).collect()
        };
        Judge::new(consumers, &workers, Instant::now())
    }

    /// The targets' version (see `Targets::version`).
    fn version(&self) -> u64 {
        self.targets.lock().expect("lock").version
    }

    /// Forget TaskQueues that no longer exist (reconcile is not called for deleted objects).
    fn prune(&self, store: &Store<TaskQueue>) {
        let gone: Vec<Key> = {
            let targets = self.targets.lock().expect("lock");
            targets.target_of.keys().filter(|k| store.get(k).is_none()).cloned().collect()
        };
        for key in &gone {
            self.unregister(key);
        }
    }

    /// One pass of the supervisor: a reader and a heartbeat subscription for each endpoint in
    /// use (restarting any that died), none for the others, and their connections closed.
    pub async fn tidy(self: &Arc<Self>, trigger: &UnboundedSender<Key>) {
        self.sync_readers(trigger).await;
        self.sync_heartbeats();
    }

    /// One reader per endpoint in use: start missing ones (and ones that died), stop unused
    /// ones and drop their connections.
    async fn sync_readers(self: &Arc<Self>, trigger: &UnboundedSender<Key>) {
        let want: HashSet<BrokerEndpoint> = self.endpoints().into_iter().collect();
        let unused: Vec<BrokerEndpoint> = {
            let mut readers = self.readers.lock().expect("lock");
            let unused: Vec<BrokerEndpoint> = readers.keys().filter(|e| !want.contains(*e)).cloned().collect();
            for e in &unused {
                if let Some(r) = readers.remove(e) {
                    r.task.abort();
                }
            }
            for endpoint in &want {
                if readers.get(endpoint).is_some_and(|r| r.task.is_finished()) {
                    // Readers loop until aborted: a finished one panicked. Start it again.
                    error!(broker = %endpoint, "broker reader stopped unexpectedly; restarting it");
                    readers.remove(endpoint);
                }
                readers.entry(endpoint.clone()).or_insert_with(|| {
                    let wakes = Arc::new(Wakes::default());
                    let task = tokio::spawn(read_loop(self.clone(), endpoint.clone(), wakes.clone(), trigger.clone()));
                    Reader { task, wakes }
                });
            }
            unused
        };
        self.push_config.lock().expect("lock").retain(|e, _| want.contains(e));
        self.bindings.lock().expect("lock").retain(|e, _| want.contains(e));
        self.unacked.lock().expect("lock").retain(|e, _| want.contains(e));
        self.servers.lock().expect("lock").retain(|e, _| want.contains(e));
        for e in unused {
            self.pool.forget(&e).await;
        }
    }

    /// Start subscriptions for new (broker, prefix) pairs and stop unused ones (and restart
    /// one that died). Each also carries the broker's list-push notifications.
    pub fn sync_heartbeats(self: &Arc<Self>) {
        let want = self.wanted_subscriptions();
        let mut subs = self.heartbeats.lock().expect("lock");
        subs.retain(|k, (_, _, task)| {
            let keep = want.contains(k) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for (endpoint, prefix) in want {
            subs.entry((endpoint.clone(), prefix.clone())).or_insert_with(|| {
                let (workers, push) = (SharedWorkers::default(), SharedPush::default());
                let state = Arc::downgrade(self);
                let at = endpoint.clone();
                let hook: PushHook = Arc::new(move |key: &[u8]| {
                    if let Some(state) = state.upgrade() {
                        state.pushed(&at, key);
                    }
                });
                let task = tokio::spawn(heartbeat::subscribe(
                    endpoint,
                    vec![prefix],
                    workers.clone(),
                    (push.clone(), hook),
                    self.deadline,
                    (self.pool.limits, self.pool.read_bytes.clone()),
                ));
                (workers, push, task)
            });
        }
    }

    /// The (broker, prefix) pairs in use, derived again only when the targets changed.
    fn wanted_subscriptions(&self) -> HashSet<SubscriptionKey> {
        let targets = self.targets.lock().expect("lock");
        let mut wanted = self.wanted_subscriptions.lock().expect("lock");
        if wanted.0 != Some(targets.version) {
            let pairs: HashSet<(&BrokerEndpoint, &str)> = targets
                .by_endpoint
                .iter()
                .flat_map(|(e, group)| group.values().flat_map(move |t| t.queries.iter().map(move |q| (e, &*q.prefix))))
                .collect();
            *wanted = (Some(targets.version), pairs.into_iter().map(|(e, p)| (e.clone(), p.to_string())).collect());
        }
        wanted.1.clone()
    }

    /// Live workers, for /metrics (each pool's reaction mode is set with its other gauges).
    fn report(&self) {
        let now = Instant::now();
        let live: usize =
            self.heartbeats.lock().expect("lock").values().map(|(w, _, _)| w.lock().expect("lock").live(now)).sum();
        self.metrics.live_workers.set(i64::try_from(live).unwrap_or(i64::MAX));
    }
}

impl Drop for BrokerState {
    fn drop(&mut self) {
        for (_, _, task) in self.heartbeats.get_mut().map(|h| h.values()).into_iter().flatten() {
            task.abort();
        }
        for r in self.readers.get_mut().map(|r| r.values()).into_iter().flatten() {
            r.task.abort();
        }
    }
}

/// One endpoint's TaskQueues as a read needs them: the distinct queries to send, and for each
/// member where its queries' answers are and who shares its queues.
struct Prepared {
    version: u64,
    members: Vec<(Key, Arc<Target>)>,
    /// The distinct queries of the members, sorted, and the pipeline that reads them.
    plan: ReadPlan,
    /// Per member, the position in the plan's queries of each of its queries.
    index: Vec<Vec<usize>>,
    shares: Vec<Arc<[Share]>>,
    /// Whose workers consume each queue (see `orphans`).
    consumers: Consumers,
    /// The shortest poll interval among the members: how often the endpoint is read.
    poll: Duration,
    /// The last read of these members: a read with the same answers wakes nobody and touches
    /// no reading (at 10 000 TaskQueues, looking each up on every tick was most of the tick).
    last: Mutex<Option<LastRead>>,
}

impl Prepared {
    /// `neighbours`: the TaskQueues of other endpoints on the same server (they share queues).
    fn new(version: u64, members: Vec<(Key, Arc<Target>)>, neighbours: &[(Key, Arc<Target>)]) -> Self {
        let queries: Vec<DepthQuery> =
            members.iter().flat_map(|(_, t)| t.queries.iter().cloned()).collect::<BTreeSet<_>>().into_iter().collect();
        let index = members
            .iter()
            .map(|(_, t)| t.queries.iter().filter_map(|q| queries.binary_search(q).ok()).collect())
            .collect();
        let shares = shares(&members, neighbours).into_iter().map(Arc::from).collect();
        let poll = members.iter().map(|(_, t)| t.interval).min().unwrap_or(Duration::MAX);
        let plan = ReadPlan::new(queries);
        let mut consumers = Consumers::default();
        for (_, t) in &members {
            for q in &t.queries {
                consumers.add(&q.prefix, &q.queue, &t.pool);
            }
        }
        Self { version, members, plan, index, shares, consumers, poll, last: Mutex::default() }
    }
}

struct LastRead {
    depths: Depths,
    push: bool,
    /// When it started.
    at: Instant,
}

/// Whether a stored reading says what this read says for the member at `index`.
fn same_depths(old: &Depths, read: &Depths, index: &[usize]) -> bool {
    match (old, read) {
        (Ok(old), Ok(all)) => old.len() == index.len() && old.iter().zip(index).all(|(d, &i)| *d == all[i]),
        (Err(a), Err(b)) => a == b,
        _ => false,
    }
}

/// For each member and each of its queries, who consumes that queue: the members (and
/// neighbours: other URLs of the same server) of one namespace reading the same queue under the
/// same key prefix (a shared queue's demand is split between them, see `demand`).
fn shares(members: &[(Key, Arc<Target>)], neighbours: &[(Key, Arc<Target>)]) -> Vec<Vec<Share>> {
    let mut by_queue: HashMap<(Option<&str>, &str, &str), Vec<Consumer>> = HashMap::new();
    for (key, target) in members.iter().chain(neighbours) {
        for (i, q) in target.queries.iter().enumerate() {
            let consumer = Consumer { name: key.name.clone(), primary: i == 0, weight: target.weight };
            by_queue.entry((key.namespace.as_deref(), &q.prefix, &q.queue)).or_default().push(consumer);
        }
    }
    members
        .iter()
        .map(|(key, target)| {
            target
                .queries
                .iter()
                .map(|q| {
                    let consumers = by_queue.get(&(key.namespace.as_deref(), &q.prefix, &q.queue)).cloned();
                    Share::among(consumers.unwrap_or_default(), &key.name)
                })
                .collect()
        })
        .collect()
}

/// How long a wake-up for new targets waits for more of them (they come in bursts: startup, a
/// big apply).
const WAKE_DEBOUNCE: Duration = Duration::from_millis(100);

/// A push notification is read after this long, so a burst of pushes is one read; and pushed
/// reads of one broker are at least `PUSH_GAP` apart (a busy broker notifies constantly).
const PUSH_DEBOUNCE: Duration = Duration::from_millis(5);
const PUSH_GAP: Duration = Duration::from_millis(25);

/// A broker counts as notifying for this long after its last notification.
const PUSH_SEEN: Duration = Duration::from_secs(600);

/// How often a broker's `notify-keyspace-events` is asked (one more command, once a minute).
const CONFIG_EVERY: Duration = Duration::from_secs(60);

/// A few members of each binding set read (binding key -> members).
type BindingSamples = HashMap<String, Vec<Vec<u8>>>;

/// Members a binding set is sampled for: the automatic binding is the set's only member in a
/// Celery app, so a few are plenty, and the reply stays small whatever the set holds.
const BINDING_SAMPLE: usize = 4;

/// A few members of each query's binding set, in one round trip; a set that cannot be read
/// (wrong type, no permission) is left out: the check is advice, not part of the read.
async fn read_bindings<C: redis::aio::ConnectionLike + Send>(conn: &mut C, queries: &[DepthQuery]) -> BindingSamples {
    let keys: Vec<String> = queries.iter().map(|q| q.binding_key()).collect::<BTreeSet<_>>().into_iter().collect();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for k in &keys {
        pipe.cmd("SRANDMEMBER").arg(k).arg(BINDING_SAMPLE);
    }
    let Ok(redis::Value::Array(replies)) = pipe.query_async::<redis::Value>(conn).await else {
        return HashMap::new();
    };
    keys.into_iter()
        .zip(replies)
        .filter_map(|(k, v)| redis::from_redis_value::<Vec<Vec<u8>>>(v).ok().map(|m| (k, m)))
        .collect()
}

/// What makes a reader read before its poll interval is up: a new target, or a push to one of
/// its queues.
#[derive(Default)]
struct Wakes {
    new_target: Notify,
    push: Notify,
}

/// How long a pushed read waits: the debounce, or what is left of the gap since the last read.
fn push_delay(since_last_read: Duration) -> Duration {
    PUSH_DEBOUNCE.max(PUSH_GAP.saturating_sub(since_last_read))
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

/// One endpoint's reader: read, wake the changed TaskQueues, wait; until aborted or unused.
async fn read_loop(
    state: Arc<BrokerState>,
    endpoint: BrokerEndpoint,
    wakes: Arc<Wakes>,
    trigger: UnboundedSender<Key>,
) {
    let mut failures = 0u32;
    loop {
        // Prepared once per read: while TaskQueues register, each call may rebuild it.
        let Some(prepared) = state.prepare(&endpoint) else { return };
        let read_at = Instant::now();
        let (changed, ok) = state.read_prepared(&endpoint, &prepared).await;
        let poll = prepared.poll;
        drop(prepared);
        failures = if ok { 0 } else { failures.saturating_add(1) };
        for key in changed {
            if trigger.unbounded_send(key).is_err() {
                return; // controller stopped
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(read_interval(poll, failures)) => {}
            _ = wakes.new_target.notified() => tokio::time::sleep(WAKE_DEBOUNCE).await,
            _ = wakes.push.notified() => tokio::time::sleep(push_delay(read_at.elapsed())).await,
        }
    }
}

/// Supervise the readers and subscriptions until the controller stops.
///
/// `deleted` is set when a TaskQueue may have gone (any TaskQueue watch event): only then, or
/// after a registration (a reconcile of a TaskQueue deleted meanwhile), are targets checked
/// against the store. A quiet pass does no work per TaskQueue.
pub async fn run(
    state: Arc<BrokerState>,
    store: Store<TaskQueue>,
    trigger: UnboundedSender<Key>,
    deleted: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut pruned_at = None;
    loop {
        if trigger.is_closed() {
            return;
        }
        let version = state.version();
        if deleted.swap(false, Ordering::Relaxed) || pruned_at != Some(version) {
            state.prune(&store);
            pruned_at = Some(state.version());
        }
        state.tidy(&trigger).await;
        state.report();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = state.wake.notified() => tokio::time::sleep(WAKE_DEBOUNCE).await,
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

    #[test]
    fn pushed_reads_are_debounced_and_spaced() {
        let ms = Duration::from_millis;
        assert_eq!(push_delay(ms(0)), PUSH_GAP, "right after a read: wait out the gap");
        assert_eq!(push_delay(ms(10)), ms(15));
        assert_eq!(push_delay(ms(5_000)), PUSH_DEBOUNCE, "after a quiet spell: at once, bar the debounce");
    }

    #[test]
    fn a_push_to_a_queue_key_is_ours_and_others_are_not() {
        let e = BrokerEndpoint::parse("redis://127.0.0.1:1/0").unwrap();
        let opts = crate::crd::TransportOptions::default();
        let t = Target {
            endpoint: e.clone(),
            queries: vec![DepthQuery::new("ai", &opts)],
            interval: Duration::from_secs(1),
            weight: 1,
            pool: String::new(),
        };
        let mut targets = Targets::default();
        targets.insert(ObjectRef::<TaskQueue>::new("a").within("ns"), t.clone());
        targets.insert(ObjectRef::<TaskQueue>::new("b").within("ns"), t);
        let watched = &targets.watched[&e];
        assert!(
            watched.contains_key(b"ai".as_slice()) && watched.contains_key(b"ai\x06\x169".as_slice()),
            "every priority list"
        );
        assert!(!watched.contains_key(b"celery".as_slice()) && !watched.contains_key(b"unacked".as_slice()));
        targets.remove(&ObjectRef::<TaskQueue>::new("a").within("ns"));
        assert!(targets.watched[&e].contains_key(b"ai".as_slice()), "b still reads it");
        targets.remove(&ObjectRef::<TaskQueue>::new("b").within("ns"));
        assert!(targets.watched.is_empty());
    }

    #[test]
    fn targets_move_between_endpoints() {
        let e = |port| BrokerEndpoint::parse(&format!("redis://127.0.0.1:{port}/0")).unwrap();
        let t = |port| Target {
            endpoint: e(port),
            queries: Vec::new(),
            interval: Duration::from_secs(1),
            weight: 1,
            pool: String::new(),
        };
        let key = ObjectRef::<TaskQueue>::new("a").within("ns");
        let mut targets = Targets::default();
        assert!(targets.insert(key.clone(), t(1)));
        assert!(!targets.insert(key.clone(), t(1)), "same target again is no change");
        assert!(targets.insert(key.clone(), t(2)), "a rotated URL moves the TaskQueue");
        assert_eq!(targets.by_endpoint.keys().collect::<Vec<_>>(), [&e(2)], "the old endpoint is unused now");
        targets.remove(&key);
        assert!(targets.by_endpoint.is_empty() && targets.target_of.is_empty());
    }
}
