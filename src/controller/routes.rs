//! Publishes each namespace's Celery routing table as a ConfigMap (key `task_routes.json`).
//!
//! A small loop over the TaskQueue cache: every second it rebuilds the table (pure,
//! `routing::build_table`) of each namespace whose TaskQueues were added, removed or had their
//! spec changed, and writes the ConfigMap only when its content or owners changed (a failed
//! write is retried with backoff up to a minute, e.g. a table above the 1 MiB ConfigMap limit).
//! The ConfigMap is owned by every TaskQueue of the namespace (non-controller owner references),
//! so the garbage collector removes it with the last one; the loop also deletes it explicitly
//! when a namespace's last TaskQueue goes. A ConfigMap of that name the operator did not create
//! is never taken over: the TaskQueues say so (`RoutesAccepted=False`, `ConfigMapConflict`) and
//! the loop looks again with backoff. When what the table says about its TaskQueues changes
//! (the verdicts below), they are reconciled so their `RoutesAccepted` conditions follow.
//!
//! The loop also keeps each namespace's verdicts (which routes were left out, and why) for the
//! reconciler, so a reconcile never rebuilds its namespace's table: with n TaskQueues in a
//! namespace that would cost O(n) per reconcile and O(n²) per round.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use super::deployment::MANAGER;
use crate::crd::{Route, TaskQueue};
use crate::routing::{build_table, oldest_first, Table};

pub const KEY: &str = "task_routes.json";
/// `app.kubernetes.io/component` of the routing table ConfigMap.
const COMPONENT: &str = "celery-task-routes";

/// What a TaskQueue's verdict depends on besides its peers: its routes and the queues it consumes.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteInput {
    pub routes: Vec<Route>,
    pub queue: String,
    pub extra_queues: Vec<String>,
}

impl RouteInput {
    pub fn of(tq: &TaskQueue) -> Self {
        Self {
            routes: tq.spec.routes.clone(),
            queue: tq.spec.queue.clone(),
            extra_queues: tq.spec.extra_queues.clone(),
        }
    }
}

/// One namespace's table, as seen by each of its TaskQueues.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdicts {
    /// TaskQueue name -> (what its verdict was computed from, routes left out and why).
    pub by_name: HashMap<String, (RouteInput, Vec<String>)>,
    /// Why the table could not be published at all: (reason, message).
    pub refused: Option<(&'static str, String)>,
    /// The ConfigMaps the table is in (more than one when it is cut into parts).
    pub configmaps: Vec<String>,
}

/// Namespace -> verdicts, shared with the reconciler.
pub type SharedVerdicts = Arc<RwLock<HashMap<String, Verdicts>>>;

/// The verdicts of a namespace's table (pure).
pub fn verdicts<T: Borrow<TaskQueue>>(taskqueues: &[T], table: &Table) -> Verdicts {
    let mut by_name: HashMap<String, (RouteInput, Vec<String>)> =
        taskqueues.iter().map(|t| (t.borrow().name_any(), (RouteInput::of(t.borrow()), Vec::new()))).collect();
    for r in &table.rejected {
        let name = r.object.rsplit_once('/').map_or(r.object.as_str(), |(_, n)| n);
        if let Some((_, lost)) = by_name.get_mut(name) {
            lost.push(format!("route {:?} left out: {}", r.pattern, r.reason));
        }
    }
    Verdicts { by_name, refused: None, configmaps: Vec::new() }
}

/// Most bytes of table per ConfigMap: the API server takes at most 1 MiB of data, and the
/// metadata (labels, a few owners) needs a little room.
pub const PART_BUDGET: usize = 1_000_000;

/// Owners of the routing table ConfigMaps: the oldest TaskQueues of the namespace. The garbage
/// collector removes the table once all of them are gone (the publisher keeps the list current
/// and deletes the table itself with the last TaskQueue). A few, not all: 10 000 owner
/// references alone would not fit in a ConfigMap.
pub const MAX_OWNERS: usize = 5;

/// Name and key of part `i` (from 0) of a table: the first is `NAME` / `task_routes.json` as
/// for a table that fits; then `NAME-part002` / `task_routes.json.part002`, ... so that the
/// keys, mounted side by side, sort in table order.
pub fn part_name(name: &str, i: usize) -> (String, String) {
    match i {
        0 => (name.to_string(), KEY.to_string()),
        _ => (format!("{name}-part{:03}", i + 1), format!("{KEY}.part{:03}", i + 1)),
    }
}

/// The ConfigMaps for one namespace's TaskQueues (pure): one, or the table cut into parts of
/// at most `budget` bytes when it does not fit.
pub fn desired_configmaps(
    name: &str,
    namespace: &str,
    taskqueues: &[impl Borrow<TaskQueue>],
    table: &Table,
    budget: usize,
) -> Vec<ConfigMap> {
    let owners: Vec<OwnerReference> = oldest_first(taskqueues)
        .into_iter()
        .filter_map(|t| {
            let mut o = t.controller_owner_ref(&())?;
            o.controller = Some(false);
            o.block_owner_deletion = Some(false);
            Some(o)
        })
        .take(MAX_OWNERS)
        .collect();
    let labels = BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_string(), MANAGER.to_string()),
        ("app.kubernetes.io/component".to_string(), COMPONENT.to_string()),
    ]);
    table
        .to_json_parts(budget)
        .into_iter()
        .enumerate()
        .map(|(i, json)| {
            let (cm_name, key) = part_name(name, i);
            ConfigMap {
                metadata: ObjectMeta {
                    name: Some(cm_name),
                    namespace: Some(namespace.to_string()),
                    labels: Some(labels.clone()),
                    owner_references: Some(owners.clone()),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(key, json)])),
                ..ConfigMap::default()
            }
        })
        .collect()
}

/// Per namespace: the TaskQueues the last pass built from, what was written, and when a failed
/// (or refused) write is tried again.
#[derive(Default)]
struct NamespaceState {
    /// `(name, uid, generation)` of each TaskQueue, sorted: the table depends on nothing else.
    seen: Vec<(String, String, Option<i64>)>,
    published: Option<String>,
    /// Parts written last (None: not known since this process started).
    parts: Option<usize>,
    /// (next attempt, current backoff) after a failed write.
    retry: Option<(Instant, Duration)>,
}

const MAX_RETRY: Duration = Duration::from_secs(60);

/// The publisher's dependencies.
pub struct Publisher {
    pub client: Client,
    /// ConfigMap name.
    pub name: String,
    pub store: Store<TaskQueue>,
    pub trigger: UnboundedSender<ObjectRef<TaskQueue>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub shared: SharedVerdicts,
    /// Only the leader writes.
    pub leading: tokio::sync::watch::Receiver<bool>,
    /// Notified on every TaskQueue watch event (after the store has it).
    pub changed: Arc<tokio::sync::Notify>,
}

/// Run until the controller stops.
pub async fn run(p: Publisher) {
    let mut states: HashMap<String, NamespaceState> = HashMap::new();
    let mut leading = p.leading.clone();
    let mut due = true;
    while !p.trigger.is_closed() {
        if !*leading.borrow_and_update() {
            // Standing by: on taking over, every table is looked at afresh.
            states.clear();
            due = true;
            let _ = tokio::time::timeout(IDLE_CHECK, leadership_change(&mut leading)).await;
            continue;
        }
        if due {
            p.pass(&mut states).await;
            // At most one pass a second.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Then wait for a TaskQueue to change or a retry to come due: only those need a pass.
        // A quiet namespace of 10 000 TaskQueues costs nothing between changes.
        let now = Instant::now();
        let retry = states.values().filter_map(|st| st.retry.map(|(at, _)| at)).min();
        let wait = retry.map_or(IDLE_CHECK, |at| at.saturating_duration_since(now)).min(IDLE_CHECK);
        due = tokio::select! {
            _ = p.changed.notified() => true,
            _ = leadership_change(&mut leading) => true,
            _ = tokio::time::sleep(wait) => retry.is_some_and(|at| at <= Instant::now()),
        };
    }
}

/// Resolves when leadership changes; never, when it cannot (no leader election).
async fn leadership_change(leading: &mut tokio::sync::watch::Receiver<bool>) {
    if leading.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The longest the publisher sleeps without looking (it checks that the controller still runs).
const IDLE_CHECK: Duration = Duration::from_secs(30);

impl Publisher {
    /// Look at every namespace's TaskQueues once: rebuild what changed, drop what is gone.
    async fn pass(&self, states: &mut HashMap<String, NamespaceState>) {
        let mut by_ns: BTreeMap<String, Vec<Arc<TaskQueue>>> = BTreeMap::new();
        for tq in self.store.state() {
            by_ns.entry(tq.namespace().unwrap_or_default()).or_default().push(tq);
        }
        let now = Instant::now();
        for (ns, arcs) in &by_ns {
            let st = states.entry(ns.clone()).or_default();
            self.namespace(ns, arcs, st, now).await;
        }
        self.shared.write().expect("lock").retain(|ns, _| by_ns.contains_key(ns));
        let gone: Vec<String> = states.keys().filter(|ns| !by_ns.contains_key(*ns)).cloned().collect();
        for ns in gone {
            if self.remove(&ns, states.get(&ns).is_some_and(|st| st.published.is_some())).await {
                states.remove(&ns);
            }
        }
    }

    /// Rebuild and write one namespace's table when its TaskQueues changed (or a retry is due).
    async fn namespace(&self, ns: &str, arcs: &[Arc<TaskQueue>], st: &mut NamespaceState, now: Instant) {
        let mut seen: Vec<(String, String, Option<i64>)> =
            arcs.iter().map(|t| (t.name_any(), t.uid().unwrap_or_default(), t.metadata.generation)).collect();
        seen.sort();
        // Only status changed since the last pass (the usual case): nothing to rebuild.
        if (st.seen == seen && st.retry.is_none()) || st.retry.is_some_and(|(at, _)| now < at) {
            return;
        }
        let table = build_table(arcs);
        let cms = desired_configmaps(&self.name, ns, arcs, &table, PART_BUDGET);
        let fingerprint = serde_json::to_string(&cms).unwrap_or_default();
        let mut verdicts = verdicts(arcs, &table);
        verdicts.configmaps = cms.iter().map(|c| c.name_any()).collect();
        let outcome =
            if st.published.as_ref() == Some(&fingerprint) { Ok(()) } else { self.write_all(ns, &cms, st).await };
        match outcome {
            Ok(()) => (st.seen, st.published, st.retry) = (seen, Some(fingerprint), None),
            Err(refused) => {
                // E.g. someone else's ConfigMap: try again, but not every second.
                let backoff = st.retry.map_or(Duration::from_secs(1), |(_, b)| (b * 2).min(MAX_RETRY));
                st.retry = Some((now + backoff, backoff));
                warn!(namespace = %ns, reason = refused.0, "{}; retrying in {backoff:?}", refused.1);
                verdicts.refused = Some(refused);
            }
        }
        let old = self.shared.write().expect("lock").insert(ns.to_string(), verdicts.clone());
        // Wake only the TaskQueues whose verdict changed (all of them when the table as a whole
        // did): adding one TaskQueue to 10 000 must not reconcile the other 9 999.
        let whole = old.as_ref().is_none_or(|o| o.refused != verdicts.refused || o.configmaps != verdicts.configmaps);
        for tq in arcs {
            let name = tq.name_any();
            if whole || old.as_ref().and_then(|o| o.by_name.get(&name)) != verdicts.by_name.get(&name) {
                let _ = self.trigger.unbounded_send(ObjectRef::from_obj(&**tq));
            }
        }
    }

    /// Write every part, then delete the parts left from a bigger table.
    async fn write_all(
        &self,
        ns: &str,
        cms: &[ConfigMap],
        st: &mut NamespaceState,
    ) -> Result<(), (&'static str, String)> {
        for cm in cms {
            self.write(ns, cm).await?;
        }
        if st.parts.is_none_or(|before| before > cms.len()) {
            self.delete_parts(ns, cms.len()).await;
        }
        st.parts = Some(cms.len());
        if cms.len() > 1 {
            info!(namespace = %ns, parts = cms.len(), "the routing table is too big for one ConfigMap: cut into parts");
        }
        Ok(())
    }

    /// Write one ConfigMap, unless one of that name exists that this operator did not create:
    /// that one is never taken over. The error is (reason, message) for the condition.
    async fn write(&self, ns: &str, cm: &ConfigMap) -> Result<(), (&'static str, String)> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let name = cm.name_any();
        match api.get_opt(&name).await {
            Ok(Some(existing)) if !is_ours(&existing) => {
                return Err((
                    "ConfigMapConflict",
                    format!(
                        "ConfigMap {ns}/{name} already exists and was not created by taskqueue-operator (no label \
                         app.kubernetes.io/managed-by=taskqueue-operator); the routing table is not published until \
                         that ConfigMap is renamed or deleted, or the operator runs with another --routes-configmap"
                    ),
                ));
            }
            // Already as wanted (e.g. after a restart): no write.
            Ok(Some(existing))
                if existing.data == cm.data && existing.metadata.owner_references == cm.metadata.owner_references =>
            {
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => return Err(("RoutesNotPublished", format!("cannot read ConfigMap {ns}/{name}: {e}"))),
        }
        self.metrics.write("configmap");
        match api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(cm)).await {
            Ok(_) => {
                info!(namespace = %ns, configmap = %name, "published Celery routing table");
                Ok(())
            }
            Err(e) => Err((
                "RoutesNotPublished",
                format!("the routing table could not be written to ConfigMap {ns}/{name}: {e}"),
            )),
        }
    }

    /// Delete our parts from number `from` (from 0) on, up to the first that does not exist.
    /// Returns false when one could not be deleted (tried again later).
    async fn delete_parts(&self, ns: &str, from: usize) -> bool {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        for i in from.. {
            let (name, _) = part_name(&self.name, i);
            match api.get_opt(&name).await {
                Ok(Some(cm)) if is_ours(&cm) => {}
                Ok(_) => return true,
                Err(e) => {
                    warn!(namespace = %ns, configmap = %name, error = %e, "cannot read a routing table part");
                    return false;
                }
            }
            self.metrics.write("configmap");
            if let Err(e) = api.delete(&name, &DeleteParams::default()).await {
                if !matches!(e, kube::Error::Api(ref s) if s.code == 404) {
                    warn!(namespace = %ns, configmap = %name, error = %e, "could not delete a routing table part");
                    return false;
                }
            }
        }
        true
    }

    /// Delete the table of a namespace whose last TaskQueue went (only one we published).
    /// Returns whether the namespace is done with.
    async fn remove(&self, ns: &str, published: bool) -> bool {
        !published || self.delete_parts(ns, 0).await
    }
}

/// A ConfigMap this operator created (labelled as its routing table).
fn is_ours(cm: &ConfigMap) -> bool {
    let labels = cm.labels();
    labels.get("app.kubernetes.io/managed-by").map(String::as_str) == Some(MANAGER)
        && labels.get("app.kubernetes.io/component").map(String::as_str) == Some(COMPONENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tq(name: &str, created: &str, pattern: &str) -> TaskQueue {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue",
            "metadata": {"name": name, "namespace": "prod", "creationTimestamp": created},
            "spec": {
                "queue": name, "routes": [{"pattern": pattern}],
                "broker": {"urlSecretRef": {"name": "b"}},
                "worker": {"image": "i", "app": "a", "concurrency": 1}
            }
        }))
        .unwrap()
    }

    #[test]
    fn verdicts_name_what_each_taskqueue_lost_and_what_they_were_built_from() {
        let tqs = [tq("first", "2026-01-01T00:00:00Z", "app.*"), tq("second", "2026-02-01T00:00:00Z", "app.*")];
        let v = verdicts(&tqs, &build_table(&tqs));
        let (input, lost) = &v.by_name["first"];
        assert!(lost.is_empty());
        assert_eq!(*input, RouteInput::of(&tqs[0]));
        let (_, lost) = &v.by_name["second"];
        assert_eq!(lost.len(), 1);
        assert!(lost[0].starts_with("route \"app.*\" left out:") && lost[0].contains("first"), "{lost:?}");
    }
}
