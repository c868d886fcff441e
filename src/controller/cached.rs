//! What the watch cache keeps of a worker Deployment: identity, owner, generation, replicas and
//! the replica counts of its status. The pod template, the status conditions and the
//! annotations are most of an object and are read only when someone else changed the
//! Deployment (a whole GET then, see `reconcile::observe_deployment`).
//!
//! A type of its own, not a trimmed `k8s_openapi` Deployment: that struct is 2.4 KB inline even
//! with an empty template, and it is parsed whole. This one ignores every other field while it
//! is deserialized. At 10 000 TaskQueues that is about 20 MiB less.

use std::borrow::Cow;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::Resource;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct CachedDeployment {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Spec,
    #[serde(default)]
    pub status: Option<Status>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Spec {
    pub replicas: Option<i32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub observed_generation: Option<i64>,
    pub replicas: Option<i32>,
    pub ready_replicas: Option<i32>,
    pub available_replicas: Option<i32>,
    pub updated_replicas: Option<i32>,
    pub unavailable_replicas: Option<i32>,
}

impl Resource for CachedDeployment {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Deployment".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "apps".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "deployments".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl CachedDeployment {
    /// Drop what the parse kept but no reconcile reads from the cache.
    pub fn trim(&mut self) {
        self.metadata.managed_fields = None;
        self.metadata.annotations = None;
    }

    /// The cached part as a Deployment (empty pod template), for `plan`.
    pub fn to_deployment(&self) -> Deployment {
        Deployment {
            metadata: self.metadata.clone(),
            spec: Some(DeploymentSpec { replicas: self.spec.replicas, ..DeploymentSpec::default() }),
            status: self.status.as_ref().map(|s| DeploymentStatus {
                observed_generation: s.observed_generation,
                replicas: s.replicas,
                ready_replicas: s.ready_replicas,
                available_replicas: s.available_replicas,
                updated_replicas: s.updated_replicas,
                unavailable_replicas: s.unavailable_replicas,
                ..DeploymentStatus::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_deployment_is_parsed_into_what_the_reconcile_reads_and_nothing_else() {
        let full = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "ai", "namespace": "prod", "generation": 4, "uid": "u1",
                "labels": {"app.kubernetes.io/managed-by": "taskqueue-operator"},
                "annotations": {"deployment.kubernetes.io/revision": "3"},
                "managedFields": [{"manager": "kube-controller-manager"}],
                "ownerReferences": [{"apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue",
                    "name": "ai", "uid": "t1", "controller": true}]
            },
            "spec": {"replicas": 3, "selector": {"matchLabels": {"a": "b"}},
                "template": {"spec": {"containers": [{"name": "worker", "image": "app:1"}]}}},
            "status": {"observedGeneration": 4, "replicas": 3, "readyReplicas": 2, "availableReplicas": 2,
                "updatedReplicas": 3, "unavailableReplicas": 1,
                "conditions": [{"type": "Available", "status": "True"}]}
        });
        let mut cached: CachedDeployment = serde_json::from_value(full).unwrap();
        cached.trim();
        let d = cached.to_deployment();
        assert_eq!(d.metadata.generation, Some(4));
        assert_eq!(d.metadata.owner_references.as_ref().unwrap()[0].uid, "t1");
        assert_eq!(d.metadata.labels.as_ref().unwrap().len(), 1);
        assert_eq!((d.metadata.annotations, d.metadata.managed_fields), (None, None));
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert!(spec.template.spec.is_none(), "the pod template is not kept");
        let status = d.status.unwrap();
        assert_eq!(
            (status.observed_generation, status.replicas, status.ready_replicas, status.unavailable_replicas),
            (Some(4), Some(3), Some(2), Some(1))
        );
        assert_eq!(status.conditions, None);
        assert!(std::mem::size_of::<CachedDeployment>() * 3 < std::mem::size_of::<Deployment>());
    }
}
