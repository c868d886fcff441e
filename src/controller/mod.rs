//! The controller: watches TaskQueues and their Deployments, polls brokers, reconciles.

pub mod cached;
pub mod conditions;
pub mod deletion_cost;
pub mod deployment;
pub mod events;
pub mod installations;
pub mod memory;
pub mod orphans;
pub mod plan;
pub mod poller;
pub mod reconcile;
pub mod routes;
pub mod scale_target;
pub mod scope;
pub mod secrets;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cached::CachedDeployment;
use futures::StreamExt;
use kube::runtime::{reflector, watcher, Controller, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::crd::TaskQueue;
use crate::dashboard::{Dashboard, Source};
use crate::leader;
use crate::metrics::{Metrics, ResultLabels};
pub use reconcile::{error_policy, reconcile, reconcile_guarded, Context, Error};
pub use secrets::SecretCache;

/// Settings of `taskqueue-operator run`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch these namespaces (each with a watch of its own) instead of all (empty).
    pub namespaces: Vec<String>,
    /// Deadline of one whole broker read (connect, Sentinel discovery, LLENs, delivery tags,
    /// new unacked messages).
    pub broker_timeout: Duration,
    /// What a broker's replies may be (`--max-broker-reply`).
    pub broker_limits: crate::broker::resp::Limits,
    /// How long a broker URL read from a Secret is reused.
    pub secret_ttl: Duration,
    /// Name of the per-namespace routing table ConfigMap.
    pub routes_configmap: String,
    /// Where the controller reports (served by `http.rs`).
    pub metrics: Arc<Metrics>,
    /// The live page's history and sources (served by `http.rs`).
    pub dashboard: Arc<Dashboard>,
    /// Leader election on a Lease; None: this process always leads (one replica, tests).
    pub leader: Option<crate::leader::LeaseConfig>,
    /// Reconciles at once. Each holds an API connection and its own buffers: unbounded, a
    /// start with 10 000 TaskQueues opened 10 000 connections at once (over 1 GiB).
    pub concurrency: u16,
    /// What a podTemplate may ask beyond an ordinary pod (`--pod-policy-allow`).
    pub pod_policy: crate::pod_policy::PodPolicy,
    /// Which broker addresses TaskQueues may name (`--broker-allow`; empty: any).
    pub broker_allow: crate::broker::allow::BrokerAllow,
    /// The field manager of status writes: this installation's own (`installations.rs`).
    pub status_manager: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            broker_timeout: Duration::from_secs(2),
            broker_limits: crate::broker::resp::Limits::default(),
            secret_ttl: Duration::from_secs(30),
            routes_configmap: "celery-task-routes".into(),
            metrics: Arc::default(),
            dashboard: Arc::default(),
            leader: None,
            concurrency: DEFAULT_CONCURRENCY,
            pod_policy: crate::pod_policy::PodPolicy::default(),
            broker_allow: crate::broker::allow::BrokerAllow::default(),
            status_manager: deployment::MANAGER.to_string(),
        }
    }
}

/// Enough to keep a local API server busy (about 1 000 writes a second measured); more only
/// adds memory.
pub const DEFAULT_CONCURRENCY: u16 = 32;

/// One watch per namespace in `namespaces` (one over all of them when empty), each with the
/// default backoff and `modify` applied to every object.
fn watches<K>(
    client: &Client,
    namespaces: &[String],
    config: &watcher::Config,
    modify: impl Fn(&mut K) + Clone + Send + Sync + 'static,
) -> Vec<scope::Watch<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let one = |ns: &str, api: Api<K>| {
        let stream = watcher(api, config.clone()).default_backoff().modify(modify.clone()).boxed();
        (ns.to_string(), stream)
    };
    if namespaces.is_empty() {
        return vec![one("", Api::all(client.clone()))];
    }
    namespaces.iter().map(|ns| one(ns, Api::namespaced(client.clone(), ns))).collect()
}

/// A background task of the controller ended: the process must not go on with stale readings
/// or an unpublished routing table.
#[derive(Debug, thiserror::Error)]
#[error("the {0} task stopped: {1}")]
pub struct TaskDied(pub &'static str, pub String);

/// Run until SIGTERM/SIGINT (or until `shutdown` resolves). An error means a background task
/// (broker poller, routes publisher, janitor) ended on its own: exit non-zero so the pod restarts.
pub async fn run(
    client: Client,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), TaskDied> {
    let (dep_store, dep_writer) = reflector::store::<CachedDeployment>();
    let ours = watcher::Config::default().labels(deployment::MANAGED_BY_SELECTOR);
    // Only what every reconcile reads (see cached.rs).
    let dep_watches = watches(&client, &settings.namespaces, &ours, CachedDeployment::trim);
    // The first full list of our Deployments in every namespace: caches are filled, the API is
    // reachable.
    let metrics = settings.metrics.clone();
    let dep_stream = scope::reflect(dep_watches, dep_writer, move || metrics.set_ready()).applied_objects();
    let (trigger_tx, trigger_rx) = futures::channel::mpsc::unbounded();
    let (tq_store, tq_writer) = reflector::store::<TaskQueue>();
    // Wakes the routes publisher: its table depends on nothing but the TaskQueues.
    let tq_changed = Arc::new(tokio::sync::Notify::new());
    // Tells the broker poller to look for deleted TaskQueues.
    let tq_maybe_deleted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // managedFields and kubectl's copy of the last applied object are the bulk of an object and
    // nothing here reads them.
    let trim = |t: &mut TaskQueue| {
        installations::trim(t.managed_fields_mut()); // who wrote the status, and when
        t.annotations_mut().remove("kubectl.kubernetes.io/last-applied-configuration");
    };
    let tq_watches = watches(&client, &settings.namespaces, &watcher::Config::default(), trim);
    let tq_stream = scope::reflect(tq_watches, tq_writer, || {})
        .inspect({
            let (changed, maybe_deleted) = (tq_changed.clone(), tq_maybe_deleted.clone());
            move |_| {
                changed.notify_one();
                maybe_deleted.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })
        .applied_objects();
    // Without leader election this process leads from the start.
    let (leading_tx, leading) = watch::channel(settings.leader.is_none());
    let controller = Controller::for_stream(tq_stream, tq_store)
        .with_config(kube::runtime::controller::Config::default().concurrency(settings.concurrency))
        .owns_stream(dep_stream)
        .reconcile_on(trigger_rx)
        .reconcile_all_on(took_over(leading.clone()))
        .graceful_shutdown_on(shutdown);

    let metrics = settings.metrics.clone();
    let broker =
        Arc::new(poller::BrokerState::with_metrics(settings.broker_timeout, settings.broker_limits, metrics.clone()));
    let verdicts = routes::SharedVerdicts::default();
    let ctx = Arc::new(Context {
        client: client.clone(),
        events: events::EventPublisher::new(client.clone(), deployment::MANAGER, std::env::var("POD_NAME").ok()),
        deployments: dep_store,
        routes_configmap: settings.routes_configmap.clone(),
        broker: broker.clone(),
        memory: Default::default(),
        secrets: SecretCache::new(client.clone(), settings.secret_ttl),
        metrics: metrics.clone(),
        routes: verdicts.clone(),
        leading: leading.clone(),
        dashboard: settings.dashboard.clone(),
        pod_policy: settings.pod_policy,
        broker_allow: settings.broker_allow.clone(),
        status_manager: settings.status_manager.clone(),
        started: jiff::Timestamp::now().as_second(),
    });
    let mut tasks = JoinSet::new();
    let mut holder = Arc::default();
    let elector = settings.leader.clone().map(|cfg| {
        let running = leader::Elector::new(client.clone(), cfg.clone());
        holder = running.holder.clone();
        tasks.spawn(named("leader election", leader::run(running, leading_tx)));
        leader::Elector::new(client.clone(), cfg)
    });
    settings.dashboard.connect(Source {
        store: controller.store(),
        broker: broker.clone(),
        leading: leading.clone(),
        holder,
    });
    tasks.spawn(named("standby", stand_by_when_not_leading(ctx.clone())));
    tasks.spawn(named("broker poller", poller::run(broker, controller.store(), trigger_tx.clone(), tq_maybe_deleted)));
    let trigger_refresh = trigger_tx.clone();
    tasks.spawn(named(
        "routes publisher",
        routes::run(routes::Publisher {
            client,
            name: settings.routes_configmap.clone(),
            store: controller.store(),
            trigger: trigger_tx,
            metrics: metrics.clone(),
            shared: verdicts,
            leading,
            changed: tq_changed,
        }),
    ));
    tasks.spawn(named("janitor", janitor(ctx.clone(), controller.store())));
    tasks.spawn(named(
        "secret refresher",
        refresh_secrets(ctx.clone(), controller.store(), trigger_refresh, settings.secret_ttl),
    ));
    info!(namespaces = scope::label(&settings.namespaces), "controller starting");
    let reconciling = controller.run(reconcile_guarded, error_policy, ctx).for_each(|res| {
        let metrics = metrics.clone();
        async move {
            let result = match &res {
                Ok(_) => "ok",
                // Caught (the process goes on serving the others), and counted apart.
                Err(kube::runtime::controller::Error::ReconcilerFailed(reconcile::Error::Panicked(..), _)) => {
                    "panicked"
                }
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => "error",
                Err(_) => "controller_error",
            };
            metrics.reconciles.get_or_create(&ResultLabels { result: result.into() }).inc();
            if let Err(e) = res {
                warn!(error = %e, "reconcile error");
            }
        }
    });
    let outcome = supervise(reconciling, &mut tasks).await;
    tasks.abort_all();
    if let Some(elector) = elector {
        elector.release().await;
    }
    info!("controller stopped");
    outcome
}

/// Fires each time this replica becomes the leader: every TaskQueue is reconciled then.
fn took_over(leading: watch::Receiver<bool>) -> impl futures::Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(leading, |mut rx| async move {
        loop {
            rx.changed().await.ok()?;
            if *rx.borrow_and_update() {
                return Some(((), rx));
            }
        }
    })
}

/// On losing the lease (or never having it): read no broker, keep no memory, drop the
/// per-TaskQueue series, say so in the `taskqueue_leader` gauge. The watch caches stay warm for a takeover.
async fn stand_by_when_not_leading(ctx: Arc<Context>) {
    let mut leading = ctx.leading.clone();
    loop {
        let now = *leading.borrow_and_update();
        ctx.metrics.leader.set(i64::from(now));
        if !now {
            ctx.broker.unregister_all();
            ctx.memory.lock().expect("lock").clear();
            ctx.dashboard.clear();
            ctx.metrics.forget_all();
        }
        if leading.changed().await.is_err() {
            // The election ended: its own supervision reports that.
            futures::future::pending::<()>().await;
        }
    }
}

/// Run `main` to its end; a background task that ends first (returns or panics) is an error.
async fn supervise(main: impl std::future::Future<Output = ()>, tasks: &mut JoinSet<TaskDied>) -> Result<(), TaskDied> {
    tokio::select! {
        _ = main => Ok(()),
        Some(ended) = tasks.join_next() => {
            let died = ended.unwrap_or_else(|e| TaskDied("background", e.to_string()));
            error!("{died}; stopping so the process restarts with fresh state");
            Err(died)
        }
    }
}

/// A background task that says which one it was, and how it ended, when it ends.
async fn named(name: &'static str, task: impl std::future::Future<Output = ()>) -> TaskDied {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(task).catch_unwind().await {
        Ok(()) => TaskDied(name, "returned".into()),
        Err(panic) => TaskDied(name, format!("panicked: {}", panic_message(&*panic))),
    }
}

/// The message a panic was raised with (`panic!("...")` gives a `&str` or a `String`).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic.downcast_ref::<&str>().map(|s| s.to_string());
    text.or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default()
}

/// Broker Secrets are read with `get` only: every third of the TTL, read again the ones in use
/// that are due, and reconcile the TaskQueues of each Secret that changed (a rotated password
/// or a new broker URL reaches them without a timer on every TaskQueue).
async fn refresh_secrets(
    ctx: Arc<Context>,
    store: reflector::Store<TaskQueue>,
    trigger: futures::channel::mpsc::UnboundedSender<poller::Key>,
    ttl: Duration,
) {
    let secrets_of = |tq: &TaskQueue| {
        let ns = tq.namespace().unwrap_or_default();
        let ca = tq.spec.broker.ca_secret_ref.as_ref().map(|r| (ns.clone(), r.name.clone()));
        std::iter::once((ns.clone(), tq.spec.broker.url_secret_ref.name.clone())).chain(ca)
    };
    while !trigger.is_closed() {
        tokio::time::sleep((ttl / 3).max(Duration::from_secs(1))).await;
        if !ctx.is_leader() {
            continue;
        }
        let taskqueues = store.state();
        let in_use: HashSet<(String, String)> = taskqueues.iter().flat_map(|t| secrets_of(t)).collect();
        let changed: HashSet<(String, String)> = ctx.secrets.refresh(&in_use).await.into_iter().collect();
        for tq in taskqueues.iter().filter(|t| secrets_of(t).any(|s| changed.contains(&s))) {
            let _ = trigger.unbounded_send(reflector::ObjectRef::from_obj(&**tq));
        }
    }
}

/// Memory and metrics of objects that are gone (reconcile is not called for
/// deleted objects), every 30 s.
async fn janitor(ctx: Arc<Context>, store: reflector::Store<TaskQueue>) {
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        ctx.memory.lock().expect("lock").retain(|key, _| {
            let live = store.get(key).is_some();
            if !live {
                ctx.metrics.forget(key.namespace.as_deref().unwrap_or_default(), &key.name);
                ctx.dashboard.forget(key.namespace.as_deref().unwrap_or_default(), &key.name);
            }
            live
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_background_task_that_ends_or_panics_stops_the_controller_with_an_error() {
        let forever = futures::future::pending::<()>;
        let mut tasks = JoinSet::new();
        tasks.spawn(named("broker poller", forever()));
        tasks.spawn(named("routes publisher", async { panic!("boom") }));
        let err = supervise(forever(), &mut tasks).await.unwrap_err();
        assert_eq!(err.to_string(), "the routes publisher task stopped: panicked: boom");

        let mut tasks = JoinSet::new();
        tasks.spawn(named("janitor", async {}));
        let err = supervise(forever(), &mut tasks).await.unwrap_err();
        assert_eq!(err.to_string(), "the janitor task stopped: returned");

        let mut tasks = JoinSet::new();
        tasks.spawn(named("broker poller", forever()));
        assert!(supervise(async {}, &mut tasks).await.is_ok(), "the controller ending (shutdown) is no error");
    }
}
