//! One reconcile of one TaskQueue: observe -> validate -> decide -> apply -> status.
//! The deciding and building steps are pure (validate.rs, scaling.rs, deployment.rs); this file
//! is the IO around them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use super::conditions::{
    Conditions, BROKER_REACHABLE, DEPLOYMENT_OWNED, PAUSED, READY, ROUTES_ACCEPTED, SCALING_LIMITED, SPEC_VALID,
};
use super::deletion_cost::{self, DELETION_COST};
use super::deployment::{self, owned_by, selector_string, up_to_date, MANAGER};
use super::events::EventPublisher;
use super::poller::{BrokerState, Key, Target};
use super::routes::{RouteInput, SharedVerdicts};
use crate::broker::{BrokerEndpoint, DepthQuery};
use crate::crd::{CaSecretRef, SecretKeyRef, TaskQueue, TaskQueueStatus, PAUSED_ANNOTATION};
use crate::metrics::{Metrics, ScaleLabels, TaskQueueLabels};
use crate::scaling::{decide, Bounds, History, Load, Observation};
use crate::validate::{validate, ValidSpec};

/// Everything a reconcile needs, shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub events: EventPublisher,
    /// Deployments labelled as ours (a cache, so a steady state costs no API reads).
    pub deployments: Store<Deployment>,
    /// Name of the routing table ConfigMap (for messages).
    pub routes_configmap: String,
    pub broker: Arc<BrokerState>,
    /// What this operator did per TaskQueue; caches lag behind our own writes, memory does not.
    pub memory: Mutex<HashMap<Key, Memory>>,
    pub secrets: SecretCache,
    pub metrics: Arc<Metrics>,
    /// Each namespace's routing verdicts, kept by the routes publisher.
    pub routes: SharedVerdicts,
}

/// Per-TaskQueue state kept between reconciles.
#[derive(Default)]
pub struct Memory {
    history: History,
    /// The Deployment generation and replicas of our last write.
    applied: Option<(i64, i32)>,
    /// The last scale change (time, reason), for status.
    last_scale: Option<(Time, String)>,
    /// Failing conditions already announced by a Warning event (type -> what was announced).
    warned: HashMap<&'static str, String>,
    /// Since when the broker could not be read (for `fallbackAfter`).
    unknown_since: Option<Instant>,
    /// Whether the pause was last announced as on (None: nothing announced by this process).
    paused: Option<bool>,
}

/// How a condition moved, judged against what this process already announced: a cached status
/// can lag behind our own write and would otherwise announce the same problem twice.
#[derive(PartialEq, Eq)]
enum Transition {
    Failed,
    Recovered,
    Same,
}

fn transition(ctx: &Context, key: &Key, conds: &Conditions<'_>, type_: &'static str) -> Transition {
    let Some(c) = conds.list.iter().find(|c| c.type_ == type_) else { return Transition::Same };
    let mut memory = ctx.memory.lock().expect("lock");
    let warned = &mut memory.entry(key.clone()).or_default().warned;
    if c.status != "False" {
        let was_failing = warned.remove(type_).is_some();
        return if was_failing && c.status == "True" { Transition::Recovered } else { Transition::Same };
    }
    // A new spec problem is worth a new event; for the others only a new reason is (the cause
    // text of one outage varies from tick to tick).
    let announced = if type_ == SPEC_VALID { format!("{}: {}", c.reason, c.message) } else { c.reason.clone() };
    let new = warned.get(type_) != Some(&announced);
    warned.insert(type_, announced);
    // After a restart memory is empty: the stored status tells whether it was announced already.
    if new && conds.turned_false(type_) {
        Transition::Failed
    } else {
        Transition::Same
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading Deployment {0}: {1}")]
    GetDeployment(String, #[source] kube::Error),
    #[error("applying Deployment {0}: {1}")]
    ApplyDeployment(String, #[source] kube::Error),
    #[error("writing status of TaskQueue {0}: {1}")]
    WriteStatus(String, #[source] kube::Error),
}

type SecretKey = (String, SecretKeyRef);

/// Broker URLs from Secrets, cached briefly so a steady state does not GET a Secret per tick.
pub struct SecretCache {
    client: Client,
    ttl: Duration,
    /// (namespace, key) -> (read at, value).
    cache: Mutex<HashMap<SecretKey, (Instant, Vec<u8>)>>,
}

impl SecretCache {
    pub fn new(client: Client, ttl: Duration) -> Self {
        Self { client, ttl, cache: Mutex::default() }
    }

    /// The broker URL, or a message that says what to fix (never the URL itself).
    pub async fn get(&self, ns: &str, r: &SecretKeyRef) -> Result<String, String> {
        let bytes = self.bytes(ns, r, "the Celery broker URL", "spec.broker.urlSecretRef.key").await?;
        String::from_utf8(bytes).map_err(|_| format!("Secret {ns}/{} key {:?} is not UTF-8 text", r.name, r.key))
    }

    /// The CA bundle named by `spec.broker.caSecretRef`.
    pub async fn ca(&self, ns: &str, r: &CaSecretRef) -> Result<Vec<u8>, String> {
        let r = SecretKeyRef { name: r.name.clone(), key: r.key.clone() };
        self.bytes(ns, &r, "the PEM CA bundle of the broker", "spec.broker.caSecretRef.key").await
    }

    async fn bytes(&self, ns: &str, r: &SecretKeyRef, what: &str, key_field: &str) -> Result<Vec<u8>, String> {
        let k = (ns.to_string(), r.clone());
        if let Some((at, v)) = self.cache.lock().expect("lock").get(&k) {
            if at.elapsed() < self.ttl {
                return Ok(v.clone());
            }
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let secret = match api.get_opt(&r.name).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(format!("Secret {ns}/{} not found; create it with {what} under key {:?}", r.name, r.key))
            }
            Err(e) => return Err(format!("cannot read Secret {ns}/{}: {e}", r.name)),
        };
        let bytes = secret.data.as_ref().and_then(|d| d.get(&r.key)).map(|b| b.0.clone());
        let Some(bytes) = bytes else {
            return Err(format!("Secret {ns}/{} has no key {:?}; put {what} there or fix {key_field}", r.name, r.key));
        };
        self.cache.lock().expect("lock").insert(k, (Instant::now(), bytes.clone()));
        Ok(bytes)
    }
}

/// Pending messages of the pool, when the broker could be read.
struct Depth {
    total: i64,
    in_flight: i64,
    by_queue: BTreeMap<String, i64>,
}

pub async fn reconcile(tq: Arc<TaskQueue>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key: Key = ObjectRef::from_obj(&*tq);
    if tq.meta().deletion_timestamp.is_some() {
        forget(&ctx, &key).await;
        return Ok(Action::await_change());
    }
    let ns = tq.namespace().unwrap_or_default();
    let name = tq.name_any();
    let prev = tq.status.clone().unwrap_or_default();
    let now = Time(jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).expect("now is in range"));
    let mut conds = Conditions::new(&prev.conditions, tq.metadata.generation, now.clone());
    let mut status = TaskQueueStatus {
        observed_generation: tq.metadata.generation,
        last_scale_time: prev.last_scale_time.clone(),
        last_scale_reason: prev.last_scale_reason.clone(),
        selector: Some(selector_string(&tq)),
        ..TaskQueueStatus::default()
    };

    // 1. Validate. An invalid spec changes nothing but this object's status.
    let valid = match validate(&tq.spec, &name) {
        Ok(v) => v,
        Err(invalid) => {
            // No reads and no scaling for an invalid spec (the event memory is kept).
            ctx.broker.unregister(&key).await;
            if let Some(m) = ctx.memory.lock().expect("lock").get_mut(&key) {
                m.history = History::default();
            }
            conds.set(SPEC_VALID, false, "InvalidSpec", invalid.to_string());
            conds.set(
                READY,
                false,
                "InvalidSpec",
                "spec is invalid; the worker Deployment is left unchanged until it is fixed",
            );
            routes_accepted(&ctx, &tq, &key, &mut conds).await;
            for c in &prev.conditions {
                if conds.list.iter().all(|n| n.type_ != c.type_) {
                    conds.list.push(c.clone());
                }
            }
            if transition(&ctx, &key, &conds, SPEC_VALID) == Transition::Failed {
                warn!(taskqueue = %key, error = %invalid, "invalid spec");
                publish(&ctx, &tq, EventType::Warning, "InvalidSpec", invalid.to_string()).await;
            }
            status.conditions = conds.list;
            status.desired_replicas = prev.desired_replicas;
            status.replicas = prev.replicas;
            status.ready_replicas = prev.ready_replicas;
            write_status(&ctx, &tq, status).await?;
            return Ok(Action::await_change());
        }
    };
    conds.set(SPEC_VALID, true, "Valid", "spec is valid");
    transition(&ctx, &key, &conds, SPEC_VALID); // valid again: forget the announced problem
    routes_accepted(&ctx, &tq, &key, &mut conds).await;

    // 2. Broker depth, as last read by the poller.
    let depth = broker_depth(&ctx, &tq, &key, &valid, &mut conds).await;

    // 3. The Deployment: never take over one we do not own.
    let observed = observe_deployment(&ctx, &ns, &name).await?;
    if let Some(d) = observed.as_ref().filter(|d| !owned_by(d, &tq)) {
        let owner =
            d.owner_references().first().map_or("no owner".to_string(), |o| format!("owner {}/{}", o.kind, o.name));
        let msg = format!("Deployment {ns}/{name} already exists ({owner}) and is not managed by this TaskQueue; delete or rename that Deployment, or rename the TaskQueue");
        conds.set(DEPLOYMENT_OWNED, false, "DeploymentConflict", msg.clone());
        conds.set(READY, false, "DeploymentConflict", "the worker Deployment belongs to someone else");
        if transition(&ctx, &key, &conds, DEPLOYMENT_OWNED) == Transition::Failed {
            warn!(taskqueue = %key, "{msg}");
            publish(&ctx, &tq, EventType::Warning, "DeploymentConflict", msg).await;
        }
        if let Some(d) = depth {
            status.pending = Some(d.total);
            status.pending_by_queue = d.by_queue;
        }
        status.conditions = conds.list;
        write_status(&ctx, &tq, status).await?;
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    conds.set(DEPLOYMENT_OWNED, true, "Owned", format!("Deployment {name} is managed by this TaskQueue"));
    transition(&ctx, &key, &conds, DEPLOYMENT_OWNED);

    // 4. Decide and apply. A cached Deployment older than our last write is stale: our write
    // is the truth then (otherwise every reconcile right after a scale would scale again).
    let observed_replicas = observed.as_ref().map(|d| d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1));
    let observed_generation = observed.as_ref().and_then(|d| d.metadata.generation).unwrap_or(0);
    let applied = ctx.memory.lock().expect("lock").get(&key).and_then(|m| m.applied);
    let cache_stale = applied.is_some_and(|(generation, _)| observed_generation < generation);
    let current = if cache_stale { applied.map(|(_, r)| r) } else { observed_replicas };
    let paused = tq.annotations().get(PAUSED_ANNOTATION).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let bounds = Bounds {
        count_in_flight: valid.count_in_flight,
        min_replicas: valid.min_replicas,
        max_replicas: valid.max_replicas,
        tasks_per_replica: valid.tasks_per_replica,
        activation_threshold: valid.activation_threshold,
        stabilization_window: valid.stabilization_window,
        scale_up_max_step: valid.scale_up_max_step,
        scale_down_max_step: valid.scale_down_max_step,
        fallback: valid.fallback,
        paused,
    };
    let first_read_pending = conds.list.iter().any(|c| c.type_ == BROKER_REACHABLE && c.status == "Unknown");
    let decision = {
        let mut memory = ctx.memory.lock().expect("lock");
        let m = memory.entry(key.clone()).or_default();
        let observation = match &depth {
            Some(d) => {
                m.unknown_since = None;
                Observation::Known(Load { pending: d.total, in_flight: d.in_flight })
            }
            // Right after a (re)start or spec change the first read is still to come: not an outage.
            None if first_read_pending => Observation::Unknown { for_: Duration::ZERO },
            None => Observation::Unknown { for_: m.unknown_since.get_or_insert_with(Instant::now).elapsed() },
        };
        decide(&bounds, current, observation, &mut m.history, Instant::now())
    };
    announce_pause(&ctx, &tq, &key, &prev, paused, &mut conds).await;
    if current.is_some_and(|c| decision.replicas < c) {
        mark_idle_pods(&ctx, &tq, &key, &valid).await;
    }
    let desired = deployment::build(&tq, &valid, decision.replicas);
    let needs_write = match &observed {
        None => true,
        Some(_) if cache_stale => applied.map(|(_, r)| r) != Some(decision.replicas),
        Some(o) => !up_to_date(o, &desired),
    };
    if needs_write {
        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
        ctx.metrics.write("deployment");
        let written = api
            .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&desired))
            .await
            .map_err(|e| Error::ApplyDeployment(format!("{ns}/{name}"), e))?;
        let generation = written.metadata.generation.unwrap_or(0);
        ctx.memory.lock().expect("lock").entry(key.clone()).or_default().applied =
            Some((generation, decision.replicas));
    }
    if current != Some(decision.replicas) {
        info!(taskqueue = %key, replicas = decision.replicas, reason = %decision.reason, "scaled");
        let reason = match current {
            None => "Created",
            Some(c) if c < decision.replicas => "ScaledUp",
            Some(_) => "ScaledDown",
        };
        if let Some(c) = current {
            let direction = if c < decision.replicas { "up" } else { "down" };
            let labels = ScaleLabels { namespace: ns.clone(), name: name.clone(), direction: direction.into() };
            ctx.metrics.scale_events.get_or_create(&labels).inc();
        }
        publish(&ctx, &tq, EventType::Normal, reason, decision.reason.clone()).await;
        ctx.memory.lock().expect("lock").entry(key.clone()).or_default().last_scale =
            Some((now.clone(), decision.reason.clone()));
    }
    if let Some((at, why)) = ctx.memory.lock().expect("lock").get(&key).and_then(|m| m.last_scale.clone()) {
        status.last_scale_time = Some(at);
        status.last_scale_reason = Some(why);
    }

    // Why the count is what it is right now (lastScaleReason only says why it last changed).
    if decision.limited {
        conds.set(SCALING_LIMITED, true, "Limited", decision.reason.clone());
    } else {
        conds.set(SCALING_LIMITED, false, "FollowsDemand", decision.reason.clone());
    }

    // 5. Status.
    let dstatus = observed.as_ref().and_then(|d| d.status.as_ref());
    status.replicas = Some(dstatus.and_then(|s| s.replicas).unwrap_or(0));
    status.ready_replicas = Some(dstatus.and_then(|s| s.ready_replicas).unwrap_or(0));
    status.desired_replicas = Some(decision.replicas);
    let reachable = conds.list.iter().any(|c| c.type_ == BROKER_REACHABLE && c.status == "True");
    if let Some(d) = depth {
        status.pending = Some(d.total);
        status.in_flight = Some(d.in_flight);
        status.pending_by_queue = d.by_queue;
    }
    let ready = status.ready_replicas.unwrap_or(0);
    if !reachable {
        conds.set(
            READY,
            false,
            "BrokerNotRead",
            format!("replicas held at {}: the broker could not be read (see BrokerReachable)", decision.replicas),
        );
    } else if ready < decision.replicas {
        conds.set(READY, false, "WorkersNotReady", format!("{ready}/{} worker pods ready", decision.replicas));
    } else {
        conds.set(READY, true, "WorkersReady", format!("{ready}/{} worker pods ready", decision.replicas));
    }
    match transition(&ctx, &key, &conds, BROKER_REACHABLE) {
        Transition::Failed => {
            let c = conds.list.iter().find(|c| c.type_ == BROKER_REACHABLE).cloned().expect("set above");
            warn!(taskqueue = %key, reason = %c.reason, "{}", c.message);
            publish(&ctx, &tq, EventType::Warning, &c.reason, c.message).await;
        }
        Transition::Recovered => {
            let note = "broker readable again; scaling resumed".to_string();
            publish(&ctx, &tq, EventType::Normal, "BrokerReachable", note).await;
        }
        Transition::Same => {}
    }
    let labels = TaskQueueLabels { namespace: ns.clone(), name: name.clone() };
    let m = &ctx.metrics;
    if let (Some(p), Some(f)) = (status.pending, status.in_flight) {
        m.pending.get_or_create(&labels).set(p);
        m.in_flight.get_or_create(&labels).set(f);
    }
    m.desired_replicas.get_or_create(&labels).set(i64::from(decision.replicas));
    m.broker_up.get_or_create(&labels).set(i64::from(reachable));
    m.paused.get_or_create(&labels).set(i64::from(paused));
    status.conditions = conds.list;
    write_status(&ctx, &tq, status).await?;

    // The poller wakes us when the depth changes; a pending scale-down needs a look once per
    // poll so it happens when the window ends.
    Ok(if decision.replicas != decision.recommended || !reachable {
        Action::requeue(valid.poll_interval)
    } else {
        Action::requeue(Duration::from_secs(60))
    })
}

/// Right before a scale-in: set each worker pod's deletion cost to its running tasks, so the
/// ReplicaSet removes idle workers first. Best effort: a failure is logged, the scale-in goes on.
async fn mark_idle_pods(ctx: &Context, tq: &TaskQueue, key: &Key, valid: &ValidSpec) {
    let ns = tq.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let list = match pods.list(&ListParams::default().labels(&selector_string(tq))).await {
        Ok(l) => l.items,
        Err(e) => {
            warn!(taskqueue = %key, error = %e, "cannot list worker pods; scaling in without deletion costs");
            return;
        }
    };
    let workers = ctx.broker.workers(key).await;
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

/// The `Paused` condition, and one event each time the pause goes on or off.
async fn announce_pause(
    ctx: &Context,
    tq: &TaskQueue,
    key: &Key,
    prev: &TaskQueueStatus,
    paused: bool,
    conds: &mut Conditions<'_>,
) {
    if paused {
        let msg =
            format!("replicas frozen by annotation {PAUSED_ANNOTATION}=true; the worker template still reconciles");
        conds.set(PAUSED, true, "Annotated", msg);
    } else {
        conds.set(PAUSED, false, "Active", "replicas follow the broker");
    }
    let announced = {
        let mut memory = ctx.memory.lock().expect("lock");
        let m = memory.entry(key.clone()).or_default();
        // After a restart the stored condition tells what was announced already.
        let before =
            m.paused.unwrap_or_else(|| prev.conditions.iter().any(|c| c.type_ == PAUSED && c.status == "True"));
        m.paused = Some(paused);
        before
    };
    if announced != paused {
        let (reason, note) = if paused {
            ("Paused", format!("scaling paused by annotation {PAUSED_ANNOTATION}=true"))
        } else {
            ("Resumed", "scaling resumed: replicas follow the broker again".to_string())
        };
        publish(ctx, tq, EventType::Normal, reason, note).await;
    }
}

/// `RoutesAccepted`: whether all of this TaskQueue's routes made it into the namespace table, as
/// the routes publisher last built it. A verdict computed from other routes or queues than the
/// object has now is not used: the publisher's next pass (within a second) re-reconciles it.
async fn routes_accepted(ctx: &Context, tq: &TaskQueue, key: &Key, conds: &mut Conditions<'_>) {
    let (ns, name) = (tq.namespace().unwrap_or_default(), tq.name_any());
    let verdict = {
        let shared = ctx.routes.read().expect("lock");
        shared.get(&ns).and_then(|v| v.by_name.get(&name)).filter(|(input, _)| *input == RouteInput::of(tq)).cloned()
    };
    let Some((_, lost)) = verdict else {
        let msg = format!("waiting for the routing table of namespace {ns} to include this TaskQueue's routes");
        conds.unknown(ROUTES_ACCEPTED, "Pending", msg);
        return;
    };
    if lost.is_empty() {
        let n = tq.spec.routes.len();
        conds.set(ROUTES_ACCEPTED, true, "Published", format!("{n} route(s) in ConfigMap {}", ctx.routes_configmap));
        transition(ctx, key, conds, ROUTES_ACCEPTED);
    } else {
        let msg = lost.join("; ");
        conds.set(ROUTES_ACCEPTED, false, "RouteConflict", msg.clone());
        if transition(ctx, key, conds, ROUTES_ACCEPTED) == Transition::Failed {
            publish(ctx, tq, EventType::Warning, "RouteConflict", msg).await;
        }
    }
}

async fn forget(ctx: &Context, key: &Key) {
    ctx.metrics.forget(key.namespace.as_deref().unwrap_or_default(), &key.name);
    ctx.broker.unregister(key).await;
    ctx.memory.lock().expect("lock").remove(key);
}

/// Resolve the broker, register what the poller must read, and return the latest reading.
async fn broker_depth(
    ctx: &Context,
    tq: &TaskQueue,
    key: &Key,
    valid: &ValidSpec,
    conds: &mut Conditions<'_>,
) -> Option<Depth> {
    let ns = tq.namespace().unwrap_or_default();
    let sref = &tq.spec.broker.url_secret_ref;
    let url = match ctx.secrets.get(&ns, sref).await {
        Ok(u) => u,
        Err(msg) => {
            ctx.broker.unregister(key).await;
            conds.set(BROKER_REACHABLE, false, "BrokerSecretMissing", msg);
            return None;
        }
    };
    let ca = match &tq.spec.broker.ca_secret_ref {
        None => None,
        Some(r) => match ctx.secrets.ca(&ns, r).await {
            Ok(pem) => Some(pem),
            Err(msg) => {
                ctx.broker.unregister(key).await;
                conds.set(BROKER_REACHABLE, false, "BrokerSecretMissing", msg);
                return None;
            }
        },
    };
    let opts = &tq.spec.broker.transport_options;
    let endpoint = match BrokerEndpoint::resolve(&url, opts.master_name.as_deref(), ca) {
        Ok(e) => e,
        Err(e) => {
            ctx.broker.unregister(key).await;
            conds.set(
                BROKER_REACHABLE,
                false,
                "InvalidBrokerURL",
                format!("Secret {ns}/{} key {:?}: {e}", sref.name, sref.key),
            );
            return None;
        }
    };
    let target = Target {
        endpoint,
        queries: valid.queues.iter().map(|q| DepthQuery::new(q, opts)).collect(),
        interval: valid.poll_interval,
    };
    ctx.broker.register(key.clone(), target.clone()).await;
    let Some(reading) = ctx.broker.reading(key).await.filter(|r| r.matches(&target)) else {
        conds.unknown(BROKER_REACHABLE, "Reading", format!("waiting for the first read of {}", target.endpoint));
        return None;
    };
    let per_queue = match reading.depths {
        Ok(d) => d,
        Err(e) => {
            conds.set(BROKER_REACHABLE, false, e.reason(), e.to_string());
            return None;
        }
    };
    let mut depth = Depth { total: 0, in_flight: 0, by_queue: BTreeMap::new() };
    for (q, d) in valid.queues.iter().zip(per_queue) {
        match d {
            Ok(d) => {
                depth.total += d.pending;
                depth.in_flight += d.in_flight;
                depth.by_queue.insert(q.clone(), d.pending);
            }
            Err(e) => {
                conds.set(BROKER_REACHABLE, false, e.reason(), e.to_string());
                return None;
            }
        }
    }
    conds.set(BROKER_REACHABLE, true, "Read", format!("read {} queue(s) from {}", valid.queues.len(), target.endpoint));
    Some(depth)
}

async fn observe_deployment(ctx: &Context, ns: &str, name: &str) -> Result<Option<Deployment>, Error> {
    if let Some(d) = ctx.deployments.get(&ObjectRef::new(name).within(ns)) {
        return Ok(Some((*d).clone()));
    }
    // Not in the cache: not created yet, just created, or someone else's (not labelled as ours).
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    api.get_opt(name).await.map_err(|e| Error::GetDeployment(format!("{ns}/{name}"), e))
}

/// Server-side apply of `/status`, skipped when nothing changed (zero writes in a steady state).
async fn write_status(ctx: &Context, tq: &TaskQueue, status: TaskQueueStatus) -> Result<(), Error> {
    if tq.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<TaskQueue> = Api::namespaced(ctx.client.clone(), &tq.namespace().unwrap_or_default());
    ctx.metrics.write("status");
    let patch = json!({"apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue", "status": status});
    api.patch_status(&tq.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(|e| Error::WriteStatus(tq.name_any(), e))?;
    Ok(())
}

/// Events are best effort: a failure is logged, never fails the reconcile.
async fn publish(ctx: &Context, tq: &TaskQueue, type_: EventType, reason: &str, note: String) {
    ctx.metrics.write("event");
    if let Err(e) = ctx.events.publish(tq.object_ref(&()), type_, reason, "Reconcile", &note).await {
        warn!(error = %e, reason, "could not publish event");
    }
}

pub fn error_policy(tq: Arc<TaskQueue>, err: &Error, _ctx: Arc<Context>) -> Action {
    warn!(taskqueue = %ObjectRef::from_obj(&*tq), error = %err, "reconcile failed; retrying in 5s");
    Action::requeue(Duration::from_secs(5))
}
