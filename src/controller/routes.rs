//! Publishes each namespace's Celery routing table as a ConfigMap (key `task_routes.json`).
//!
//! A small loop over the TaskQueue cache: every second it rebuilds each namespace's table (pure,
//! `routing::build_table`), and writes the ConfigMap only when its content or owners changed.
//! The ConfigMap is owned by every TaskQueue of the namespace (non-controller owner references),
//! so the garbage collector removes it with the last one; the loop also deletes it explicitly
//! when a namespace's last TaskQueue goes. When a table changes, the TaskQueues of that
//! namespace are reconciled so their `RoutesAccepted` conditions follow.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use super::deployment::MANAGER;
use crate::crd::TaskQueue;
use crate::routing::build_table;

pub const KEY: &str = "task_routes.json";

/// The ConfigMap for one namespace's TaskQueues (pure).
pub fn desired_configmap(name: &str, namespace: &str, taskqueues: &[TaskQueue]) -> ConfigMap {
    let table = build_table(taskqueues);
    let mut owners: Vec<OwnerReference> = taskqueues
        .iter()
        .filter_map(|t| {
            let mut o = t.controller_owner_ref(&())?;
            o.controller = Some(false);
            o.block_owner_deletion = Some(false);
            Some(o)
        })
        .collect();
    owners.sort_by(|a, b| a.name.cmp(&b.name));
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".to_string(), MANAGER.to_string()),
                ("app.kubernetes.io/component".to_string(), "celery-task-routes".to_string()),
            ])),
            owner_references: Some(owners),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(KEY.to_string(), table.to_json())])),
        ..ConfigMap::default()
    }
}

/// Run forever (until the task is aborted).
pub async fn run(
    client: Client,
    name: String,
    store: Store<TaskQueue>,
    trigger: UnboundedSender<ObjectRef<TaskQueue>>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    // What was last written per namespace (content + owners), to write only on change.
    let mut published: HashMap<String, String> = HashMap::new();
    loop {
        let mut by_ns: BTreeMap<String, Vec<TaskQueue>> = BTreeMap::new();
        for tq in store.state() {
            by_ns.entry(tq.namespace().unwrap_or_default()).or_default().push((*tq).clone());
        }
        for (ns, tqs) in &by_ns {
            let cm = desired_configmap(&name, ns, tqs);
            let fingerprint = serde_json::to_string(&cm).expect("ConfigMap serializes");
            if published.get(ns) == Some(&fingerprint) {
                continue;
            }
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
            metrics.write("configmap");
            match api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&cm)).await {
                Ok(_) => {
                    info!(namespace = %ns, configmap = %name, "published Celery routing table");
                    published.insert(ns.clone(), fingerprint);
                    for tq in tqs {
                        let _ = trigger.unbounded_send(ObjectRef::from_obj(tq));
                    }
                }
                Err(e) => warn!(namespace = %ns, error = %e, "could not publish the routing table; retrying"),
            }
        }
        let gone: Vec<String> = published.keys().filter(|ns| !by_ns.contains_key(*ns)).cloned().collect();
        for ns in gone {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
            metrics.write("configmap");
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) | Err(kube::Error::Api(_)) => {
                    published.remove(&ns);
                }
                Err(e) => warn!(namespace = %ns, error = %e, "could not delete the routing table; retrying"),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
