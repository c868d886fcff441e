//! One reconcile of one TaskQueue: observe -> plan -> apply -> publish.
//!
//! `observe` gathers what the decision needs (the spec's validation, the broker reading, the
//! Deployment, the routing verdict, this process's memory); `plan` (pure, plan.rs) turns it into
//! the Deployment to write, the whole status and the events; `apply` writes the Deployment, and
//! a write the API server refuses goes back through `plan` as one more thing seen; `publish`
//! stores the memory and writes the events, metrics and status. Every outcome takes this path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use super::cached::CachedDeployment;
use super::conditions::BROKER_REACHABLE;
use super::deletion_cost::{self, DELETION_COST};
use super::deployment::{self, selector_string, MANAGER};
use super::events::EventPublisher;
use super::installations;
use super::memory::{Applied, Memory, Rejected, StatusWrite, STATUS_CACHE_LAG};
use super::plan::{self, Announcement, BrokerView, Plan, RoutesView, Seen};
use super::poller::{BrokerState, Key, Target};
use super::routes::{RouteInput, SharedVerdicts};
use super::scale_target::{self, TargetCheck};
use super::secrets::SecretCache;
use crate::broker::workers::pool_name;
use crate::broker::{BrokerEndpoint, DepthQuery, ReadError};
use crate::crd::{TaskQueue, TaskQueueStatus};
use crate::dashboard::{now_millis, Dashboard, Mark, Sample};
use crate::demand::QueueReading;
use crate::metrics::{Metrics, ScaleLabels, TaskQueueLabels};
use crate::pod_policy::PodPolicy;
use crate::report::not_ok_conditions;
use crate::validate::{validate_with, ValidSpec};

/// Everything a reconcile needs, shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub events: EventPublisher,
    /// Deployments labelled as ours (a cache, so a steady state costs no API reads).
    pub deployments: Store<CachedDeployment>,
    /// Name of the routing table ConfigMap (for messages).
    pub routes_configmap: String,
    pub broker: Arc<BrokerState>,
    /// What this operator did per TaskQueue (see memory.rs).
    pub memory: Mutex<HashMap<Key, Memory>>,
    pub secrets: SecretCache,
    pub metrics: Arc<Metrics>,
    /// Each namespace's routing verdicts, kept by the routes publisher.
    pub routes: SharedVerdicts,
    /// Whether this replica holds the leader Lease (always true without leader election).
    pub leading: tokio::sync::watch::Receiver<bool>,
    /// The live page's history.
    pub dashboard: Arc<Dashboard>,
    /// What a podTemplate may ask beyond an ordinary pod.
    pub pod_policy: PodPolicy,
    /// Which broker addresses TaskQueues may name.
    pub broker_allow: crate::broker::allow::BrokerAllow,
    /// This installation's field manager for status writes (`installations.rs`).
    pub status_manager: String,
    /// When this process started (Unix seconds): older writes of others are not live.
    pub started: i64,
}

impl Context {
    /// Only the leader reads brokers and writes anything.
    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }
}

/// Looked at again this long after a reconcile that found its first broker read still to come,
/// should the poller's wake-up not come.
const FIRST_READ_RECHECK: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading Deployment {0}: {1}")]
    GetDeployment(String, #[source] kube::Error),
    #[error("applying Deployment {0}: {1}")]
    ApplyDeployment(String, #[source] kube::Error),
    #[error("writing status of TaskQueue {0}: {1}")]
    WriteStatus(String, #[source] kube::Error),
    #[error("reconcile of {0} panicked: {1}")]
    Panicked(String, String),
}

/// [`reconcile`], with a panic turned into an error for this object alone: whatever one
/// TaskQueue holds, the process goes on serving the others.
pub async fn reconcile_guarded(tq: Arc<TaskQueue>, ctx: Arc<Context>) -> Result<Action, Error> {
    use futures::FutureExt;
    let key = ObjectRef::from_obj(&*tq).to_string();
    std::panic::AssertUnwindSafe(reconcile(tq, ctx))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| Err(Error::Panicked(key, super::panic_message(&*panic))))
}

pub async fn reconcile(tq: Arc<TaskQueue>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key: Key = ObjectRef::from_obj(&*tq);
    debug!("reconcile"); // within the runtime's span, which says why
    if tq.meta().deletion_timestamp.is_some() {
        forget(&ctx, &key);
        return Ok(Action::await_change());
    }
    // A standby does nothing: it is told to reconcile everything when it takes over. Leadership
    // is looked at again before each write, so a lost Lease stops writes within one reconcile.
    if !ctx.is_leader() {
        return Ok(Action::await_change());
    }
    let mut seen = observe(&ctx, &tq, &key).await?;
    if matches!(seen.broker, BrokerView::Waiting(_)) {
        // Nothing to decide before the first read of this target: the poller reconciles us
        // when it is done (or failed, within the broker deadline). A status written now would
        // be rewritten right after: on a restart with 10 000 TaskQueues, 20 000 writes.
        return Ok(Action::requeue(FIRST_READ_RECHECK));
    }
    let mut plan = plan::plan(&tq, &seen);
    if !ctx.is_leader() {
        return Ok(Action::await_change());
    }
    if plan.stand_back {
        // Another installation reconciles this object: write nothing, say so once.
        for a in std::mem::take(&mut plan.events) {
            event(&ctx, &tq, a).await;
        }
        ctx.memory.lock().expect("lock").insert(key, plan.memory);
        return Ok(Action::requeue(installations::RECENT / 3));
    }
    if let Some(refused) = apply(&ctx, &tq, &seen, &mut plan).await? {
        seen.memory.rejected = Some(refused);
        plan = plan::plan(&tq, &seen);
    }
    if !ctx.is_leader() {
        return Ok(Action::await_change());
    }
    publish(&ctx, &tq, key, plan).await
}

/// What the decision needs. An invalid spec is not read further: no broker, no API reads.
async fn observe(ctx: &Context, tq: &TaskQueue, key: &Key) -> Result<Seen, Error> {
    let mut valid = validate_with(&tq.spec, &tq.name_any(), &ctx.pod_policy);
    let memory = ctx.memory.lock().expect("lock").get(key).cloned().unwrap_or_default();
    // A scale target is read first: its command names the workers the broker side listens for.
    let (target_deployment, target) = match &mut valid {
        Ok(v) => observe_target(ctx, tq, v).await?,
        Err(_) => (None, None),
    };
    let broker = match &valid {
        Ok(v) => observe_broker(ctx, tq, key, v).await,
        Err(_) => {
            ctx.broker.unregister(key);
            BrokerView::NotRead
        }
    };
    let deployment = match (&valid, &broker) {
        (Ok(v), _) if v.scale_target.is_some() => target_deployment,
        (Ok(_), BrokerView::Waiting(_)) => None, // not looked at before the first read (see `reconcile`)
        (Ok(_), _) => observe_deployment(ctx, tq, &memory).await?,
        (Err(_), _) => cached_deployment(ctx, tq),
    };
    let now = jiff::Timestamp::now().as_second();
    Ok(Seen {
        valid,
        broker,
        deployment,
        routes: observe_routes(ctx, tq),
        heard: ctx.broker.heard(key, Instant::now()),
        target,
        installations: installations::verdict(
            tq.managed_fields(),
            &ctx.status_manager,
            ctx.started.max(now - installations::RECENT.as_secs() as i64),
        ),
        memory,
        now: Time(jiff::Timestamp::from_second(now).unwrap_or(jiff::Timestamp::UNIX_EPOCH)),
        instant: Instant::now(),
    })
}

/// With `spec.scaleTargetRef`: the Deployment it names, read whole (it is not labelled as ours, so not
/// in the watch cache), and what its worker command says; the spec takes the worker name and
/// concurrency from it.
async fn observe_target(
    ctx: &Context,
    tq: &TaskQueue,
    valid: &mut ValidSpec,
) -> Result<(Option<Deployment>, Option<TargetCheck>), Error> {
    let Some(target) = valid.scale_target.clone() else { return Ok((None, None)) };
    let ns = tq.namespace().unwrap_or_default();
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let d = api.get_opt(&target.name).await.map_err(|e| Error::GetDeployment(format!("{ns}/{}", target.name), e))?;
    let check = d.as_ref().map(|d| {
        let check = scale_target::check(d, &target, &valid.queues, !valid.tasks_per_replica_from_target);
        scale_target::resolve(valid, &check);
        check
    });
    Ok((d, check))
}

/// Resolve the broker from the Secrets, register what the poller must read, and return the
/// latest reading. When the broker refuses what the Secrets said (a rotated URL, password or
/// CA), they are read again before the failure is reported: the new values are used within one
/// poll of the old ones failing.
async fn observe_broker(ctx: &Context, tq: &TaskQueue, key: &Key, valid: &ValidSpec) -> BrokerView {
    let mut fresh_after = None;
    loop {
        let target = match resolve_target(ctx, tq, valid, fresh_after).await {
            Ok(t) => t,
            Err((reason, msg)) => {
                ctx.broker.unregister(key);
                return BrokerView::Failed(reason, msg);
            }
        };
        ctx.broker.register(key.clone(), target.clone());
        let Some(reading) = ctx.broker.reading(key).filter(|r| r.matches(&target)) else {
            return BrokerView::Waiting(format!("waiting for the first read of {}", target.endpoint));
        };
        let failure = match reading.depths {
            Ok(per_queue) => match per_queue.into_iter().collect::<Result<Vec<_>, _>>() {
                Ok(depths) => {
                    let queues = valid
                        .queues
                        .iter()
                        .zip(depths)
                        .zip(reading.shares.iter().cloned())
                        .map(|((queue, depth), share)| QueueReading { queue: queue.clone(), depth, share })
                        .collect();
                    let mode = reaction_mode(reading.push, &target);
                    let message = format!("read {} queue(s) from {}; {mode}", valid.queues.len(), target.endpoint);
                    return BrokerView::Read { queues, message };
                }
                Err(e) => e,
            },
            Err(e) => e,
        };
        // A key of the wrong type is the app's layout, not the Secret: nothing to re-read.
        if fresh_after.is_some() || matches!(failure, ReadError::WrongType { .. }) {
            return BrokerView::Failed(failure.reason(), failure.to_string());
        }
        fresh_after = Some(reading.at);
    }
}

/// How this TaskQueue's broker is watched, for `BrokerReachable`: by push, or by polling (with
/// how to turn push on).
fn reaction_mode(push: bool, target: &Target) -> String {
    if push {
        return "reacting by push (list-push notifications)".to_string();
    }
    format!(
        "polling every {}: the broker sends no list-push notifications (notify-keyspace-events with E and \
         l, e.g. El, makes it react at once)",
        humantime::format_duration(target.interval)
    )
}

/// The poller target a valid spec describes; the error is (reason, message) for the condition.
async fn resolve_target(
    ctx: &Context,
    tq: &TaskQueue,
    valid: &ValidSpec,
    fresh_after: Option<Instant>,
) -> Result<Target, (&'static str, String)> {
    let ns = tq.namespace().unwrap_or_default();
    let sref = &tq.spec.broker.url_secret_ref;
    let missing = |msg| ("BrokerSecretMissing", msg);
    let url = ctx.secrets.url(&ns, sref, fresh_after).await.map_err(missing)?;
    let ca = match &tq.spec.broker.ca_secret_ref {
        None => None,
        Some(r) => Some(ctx.secrets.ca(&ns, r, fresh_after).await.map_err(missing)?),
    };
    let opts = &tq.spec.broker.transport_options;
    let endpoint = BrokerEndpoint::resolve(&url, opts.master_name.as_deref(), ca).map_err(|e| {
        ("InvalidBrokerURL", format!("Secret {ns}/{} key {:?} (spec.broker.urlSecretRef): {e}", sref.name, sref.key))
    })?;
    if let Some(address) = ctx.broker_allow.refused(&endpoint) {
        let msg = format!(
            "the broker URL in Secret {ns}/{} (spec.broker.urlSecretRef) names {address}, which is not among the \
             brokers this operator may connect to (chart value brokerAllow, run --broker-allow); nothing was dialled",
            sref.name
        );
        return Err(("BrokerNotAllowed", msg));
    }
    Ok(Target {
        endpoint,
        queries: valid.queues.iter().map(|q| DepthQuery::new(q, opts)).collect(),
        interval: valid.poll_interval,
        weight: i64::from(valid.max_replicas).saturating_mul(valid.tasks_per_replica),
        pool: pool_name(&valid.node_name, &valid.deployment),
    })
}

/// The worker Deployment. The cached copy has no pod template (`cached.rs`): enough while
/// the Deployment is as this process last wrote it. One changed by someone else since, or not
/// written by this process yet (after a start), is read whole, so `plan` can compare it with
/// the spec; the next reconciles use the cache again.
async fn observe_deployment(ctx: &Context, tq: &TaskQueue, memory: &Memory) -> Result<Option<Deployment>, Error> {
    if let Some(d) = cached_deployment(ctx, tq) {
        let generation = d.metadata.generation.unwrap_or(0);
        if memory.applied.is_some_and(|a| generation <= a.generation) {
            return Ok(Some(d));
        }
    }
    // Not in the cache: not created yet, just created, or someone else's (not labelled as ours).
    let (ns, name) = (tq.namespace().unwrap_or_default(), tq.name_any());
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    api.get_opt(&name).await.map_err(|e| Error::GetDeployment(format!("{ns}/{name}"), e))
}

fn cached_deployment(ctx: &Context, tq: &TaskQueue) -> Option<Deployment> {
    let key = ObjectRef::new(&tq.name_any()).within(&tq.namespace().unwrap_or_default());
    ctx.deployments.get(&key).map(|d| d.to_deployment())
}

/// This TaskQueue's routes in its namespace's table, as the routes publisher last built it. A
/// verdict computed from other routes or queues than the object has now is not used: the
/// publisher's next pass (within a second) reconciles it again.
fn observe_routes(ctx: &Context, tq: &TaskQueue) -> RoutesView {
    let (ns, name) = (tq.namespace().unwrap_or_default(), tq.name_any());
    let pending = || {
        RoutesView::Pending(format!(
            "waiting for the routing table of namespace {ns} to include this TaskQueue's routes"
        ))
    };
    let shared = ctx.routes.read().expect("lock");
    let Some(verdicts) = shared.get(&ns) else { return pending() };
    if let Some((reason, msg)) = &verdicts.refused {
        return RoutesView::Refused(reason, msg.clone());
    }
    match verdicts.by_name.get(&name).filter(|(input, _)| *input == RouteInput::of(tq)) {
        None => pending(),
        Some((_, lost)) if lost.is_empty() => RoutesView::Published(match verdicts.configmaps.as_slice() {
            [_, _, ..] => format!(
                "{} route(s) in the namespace's routing table, which is too big for one ConfigMap and is cut into {} \
                 parts: ConfigMaps {}; mount them all in one directory and load the files in name order (README: \
                 Routing table)",
                tq.spec.routes.len(),
                verdicts.configmaps.len(),
                verdicts.configmaps.join(", ")
            ),
            _ => format!("{} route(s) in ConfigMap {}", tq.spec.routes.len(), ctx.routes_configmap),
        }),
        Some((_, lost)) => RoutesView::Refused("RouteConflict", lost.join("; ")),
    }
}

/// Write the planned Deployment. A write the API server refuses (a 4xx other than a conflict or
/// throttling) is returned to be planned for; anything else is an error retried with backoff.
async fn apply(ctx: &Context, tq: &TaskQueue, seen: &Seen, plan: &mut Plan) -> Result<Option<Rejected>, Error> {
    if let Some(replicas) = plan.scale_target {
        set_target_replicas(ctx, tq, seen, plan, replicas).await?;
        return Ok(None);
    }
    let Some(desired) = &plan.deployment else { return Ok(None) };
    let (ns, name) = (tq.namespace().unwrap_or_default(), tq.name_any());
    let observed_uid = seen.deployment.as_ref().and_then(|d| d.metadata.uid.clone());
    if let (true, Ok(valid), Some(uid)) = (plan.scale_in, &seen.valid, observed_uid) {
        mark_idle_pods(ctx, tq, valid, &selector_string(tq), &uid).await;
    }
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(ops) = &plan.repair {
        let ops: json_patch::Patch = serde_json::from_value(ops.clone()).unwrap_or_default();
        let params = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
        ctx.metrics.write("deployment");
        api.patch(&name, &params, &Patch::Json::<()>(ops))
            .await
            .map_err(|e| Error::ApplyDeployment(format!("{ns}/{name}"), e))?;
    }
    ctx.metrics.write("deployment");
    match api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(desired)).await {
        Ok(written) => {
            if let Some(why) = &plan.restores {
                info!(taskqueue = %ObjectRef::from_obj(tq), "{why}; restored");
            }
            plan.memory.applied = Some(Applied {
                generation: written.metadata.generation.unwrap_or(0),
                fingerprint: deployment::fingerprint(desired),
                replicas: desired.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
            });
            Ok(None)
        }
        Err(kube::Error::Api(s)) if (400..500).contains(&s.code) && !matches!(s.code, 401 | 409 | 429) => {
            warn!(taskqueue = %ObjectRef::from_obj(tq), code = s.code, "the API server refused the worker Deployment: {}", s.message);
            let template = plan.template.unwrap_or_default();
            Ok(Some(Rejected { template, message: s.message.clone(), at: seen.instant }))
        }
        Err(e) => Err(Error::ApplyDeployment(format!("{ns}/{name}"), e)),
    }
}

/// Set the scale target's `spec.replicas`, and nothing else of it (a merge patch: the app's
/// chart keeps the template). Before a scale-in, its idle pods get the lowest deletion cost.
async fn set_target_replicas(
    ctx: &Context,
    tq: &TaskQueue,
    seen: &Seen,
    plan: &mut Plan,
    replicas: i32,
) -> Result<(), Error> {
    let (Ok(valid), Some(d)) = (&seen.valid, &seen.deployment) else { return Ok(()) };
    let ns = tq.namespace().unwrap_or_default();
    let name = &valid.deployment;
    if let (true, Some(selector), Some(uid)) = (plan.scale_in, deployment::selector_of(d), d.metadata.uid.as_deref()) {
        mark_idle_pods(ctx, tq, valid, &selector, uid).await;
    }
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let params = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
    // Guarded by the uid read: a Deployment deleted and created again under the name since is
    // not scaled on the strength of the old one's reading.
    let patch = json!({"metadata": {"uid": d.metadata.uid}, "spec": {"replicas": replicas}});
    ctx.metrics.write("deployment");
    let written = api
        .patch(name, &params, &Patch::Merge(&patch))
        .await
        .map_err(|e| Error::ApplyDeployment(format!("{ns}/{name}"), e))?;
    plan.memory.applied =
        Some(Applied { generation: written.metadata.generation.unwrap_or(0), fingerprint: 0, replicas });
    Ok(())
}

/// Right before a scale-in: set each worker pod's deletion cost to its running tasks, so the
/// ReplicaSet removes idle workers first. Only pods of the Deployment's own ReplicaSets (uid
/// `deployment`) are touched. Best effort: a failure is logged, the scale-in goes on.
async fn mark_idle_pods(ctx: &Context, tq: &TaskQueue, valid: &ValidSpec, selector: &str, deployment: &str) {
    let key = ObjectRef::from_obj(tq);
    let ns = tq.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let sets: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let lp = ListParams::default().labels(selector);
    let list = match tokio::try_join!(pods.list(&lp), sets.list(&lp)) {
        Ok((pods, sets)) => deletion_cost::owned_pods(pods.items, &sets.items, deployment),
        Err(e) => {
            warn!(taskqueue = %key, error = %e, "cannot list worker pods and their ReplicaSets; scaling in without deletion costs");
            return;
        }
    };
    let workers = ctx.broker.workers(&key);
    let now = Instant::now();
    let plan = {
        let workers = workers.as_ref().map(|w| w.lock().expect("lock"));
        deletion_cost::plan(&list, &valid.node_name, |host| workers.as_ref().and_then(|w| w.active(host, now)))
    };
    for (pod, cost) in plan {
        let patch = json!({"metadata": {"annotations": {DELETION_COST: cost}}});
        ctx.metrics.write("pod");
        match pods.patch(&pod, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => debug!(taskqueue = %key, pod, cost, "set pod deletion cost"),
            Err(e) => warn!(taskqueue = %key, pod, error = %e, "cannot set pod deletion cost"),
        }
    }
}

/// Keep the memory; publish the events, the metrics and the status.
async fn publish(ctx: &Context, tq: &TaskQueue, key: Key, mut plan: Plan) -> Result<Action, Error> {
    let (ns, name) = (tq.namespace().unwrap_or_default(), tq.name_any());
    let mut mark = None;
    if let Some(s) = &plan.scale {
        info!(taskqueue = %key, replicas = s.to, reason = %s.reason, "scaled");
        if let Some(from) = s.from {
            let direction = if from < s.to { "up" } else { "down" };
            let labels = ScaleLabels { namespace: ns.clone(), name: name.clone(), direction: direction.into() };
            ctx.metrics.scale_events.get_or_create(&labels).inc();
            mark = Some(Mark { t: now_millis(), up: from < s.to, reason: s.reason.clone() });
        }
    }
    if let (Some(pending), Some(in_flight)) = (plan.status.pending, plan.status.in_flight) {
        let (desired, ready) = (plan.status.desired_replicas, plan.status.ready_replicas);
        let sample =
            Sample { t: now_millis(), pending, in_flight, desired: desired.unwrap_or(0), ready: ready.unwrap_or(0) };
        ctx.dashboard.record(&ns, &name, sample, mark);
    }
    for a in std::mem::take(&mut plan.events) {
        event(ctx, tq, a).await;
    }
    let push = ctx.broker.push_mode_of(&key);
    gauges(&ctx.metrics, TaskQueueLabels { namespace: ns, name }, &plan.status, plan.paused, push);
    let last = plan.memory.status_write.clone();
    ctx.memory.lock().expect("lock").insert(key.clone(), plan.memory);
    if let Some(written) = write_status(ctx, tq, plan.status, last.as_ref()).await? {
        if let Some(m) = ctx.memory.lock().expect("lock").get_mut(&key) {
            m.status_write = Some(written);
        }
    }
    Ok(plan.requeue.map_or_else(Action::await_change, Action::requeue))
}

fn gauges(m: &Metrics, labels: TaskQueueLabels, status: &TaskQueueStatus, paused: bool, push: Option<bool>) {
    if let (Some(p), Some(f)) = (status.pending, status.in_flight) {
        m.pending.get_or_create(&labels).set(p);
        m.in_flight.get_or_create(&labels).set(f);
        m.scheduled.get_or_create(&labels).set(status.scheduled.unwrap_or(0));
        m.orphaned.get_or_create(&labels).set(status.orphaned.unwrap_or(0));
    }
    if let Some(d) = status.desired_replicas {
        m.desired_replicas.get_or_create(&labels).set(i64::from(d));
    }
    if let Some(r) = status.ready_replicas {
        m.ready_replicas.get_or_create(&labels).set(i64::from(r));
    }
    if let Some(push) = push {
        m.broker_push.get_or_create(&labels).set(i64::from(push));
    }
    let up = status.conditions.iter().any(|c| c.type_ == BROKER_REACHABLE && c.status == "True");
    m.broker_up.get_or_create(&labels).set(i64::from(up));
    m.paused.get_or_create(&labels).set(i64::from(paused));
    let not_ok: Vec<(String, String)> =
        not_ok_conditions(&status.conditions).map(|c| (c.type_.clone(), c.reason.clone())).collect();
    m.set_not_ok(&labels.namespace, &labels.name, &not_ok);
}

fn forget(ctx: &Context, key: &Key) {
    ctx.metrics.forget(key.namespace.as_deref().unwrap_or_default(), &key.name);
    ctx.dashboard.forget(key.namespace.as_deref().unwrap_or_default(), &key.name);
    ctx.broker.unregister(key);
    ctx.memory.lock().expect("lock").remove(key);
}

/// Server-side apply of `/status`, skipped when nothing changed (zero writes in a steady state),
/// and when it is the status we wrote moments ago (the watch cache lags). Returns the write.
async fn write_status(
    ctx: &Context,
    tq: &TaskQueue,
    status: TaskQueueStatus,
    last: Option<&StatusWrite>,
) -> Result<Option<StatusWrite>, Error> {
    if tq.status.as_ref() == Some(&status) {
        return Ok(None);
    }
    let hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(&status).unwrap_or_default().hash(&mut h);
        h.finish()
    };
    if last.is_some_and(|w| w.hash == hash && w.at.elapsed() < STATUS_CACHE_LAG) {
        return Ok(None); // written already; the cache has not shown it yet
    }
    let api: Api<TaskQueue> = Api::namespaced(ctx.client.clone(), &tq.namespace().unwrap_or_default());
    ctx.metrics.write("status");
    let patch = json!({"apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue", "status": status});
    api.patch_status(&tq.name_any(), &PatchParams::apply(&ctx.status_manager).force(), &Patch::Apply(&patch))
        .await
        .map_err(|e| Error::WriteStatus(tq.name_any(), e))?;
    Ok(Some(StatusWrite { hash, at: Instant::now() }))
}

/// Events are best effort: a failure is logged, never fails the reconcile. Warnings are logged too.
async fn event(ctx: &Context, tq: &TaskQueue, a: Announcement) {
    if a.type_ == kube::runtime::events::EventType::Warning {
        warn!(taskqueue = %ObjectRef::from_obj(tq), reason = a.reason, "{}", a.note);
    }
    ctx.metrics.write("event");
    if let Err(e) = ctx.events.publish(tq.object_ref(&()), a.type_, a.reason, "Reconcile", &a.note).await {
        warn!(error = %e, reason = a.reason, "could not publish event");
    }
}

pub fn error_policy(tq: Arc<TaskQueue>, err: &Error, _ctx: Arc<Context>) -> Action {
    let wait = if matches!(err, Error::Panicked(..)) { Duration::from_secs(60) } else { Duration::from_secs(5) };
    warn!(taskqueue = %ObjectRef::from_obj(&*tq), error = %err, "reconcile failed; retrying in {wait:?}");
    Action::requeue(wait)
}
