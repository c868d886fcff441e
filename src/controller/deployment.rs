//! The worker Deployment a TaskQueue asks for (pure builder).

use std::collections::{hash_map::DefaultHasher, BTreeMap};
use std::hash::{Hash, Hasher};

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    EnvVar, EnvVarSource, PodSpec, PodTemplateSpec, ResourceRequirements, SecretKeySelector,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde_json::{json, Value};

use crate::crd::{TaskQueue, WorkerSpec};
use crate::quantity;
use crate::validate::ValidSpec;

pub use crate::crd::{CONTAINER, MANAGED_BY_SELECTOR, MANAGED_LABELS, MANAGER};
pub const DEFAULT_GRACE_SECONDS: i64 = 300;

pub fn selector_labels(tq: &TaskQueue) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_LABELS[0].to_string(), "celery-worker".to_string()),
        (MANAGED_LABELS[1].to_string(), tq.name_any()),
    ])
}

pub fn labels(tq: &TaskQueue) -> BTreeMap<String, String> {
    let mut l = selector_labels(tq);
    l.insert(MANAGED_LABELS[2].into(), MANAGER.into());
    l.insert(MANAGED_LABELS[3].into(), "worker".into());
    l
}

pub fn selector_string(tq: &TaskQueue) -> String {
    selector_labels(tq).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// A Deployment's pod selector as a label selector string (for listing its pods).
pub fn selector_of(d: &Deployment) -> Option<String> {
    let s = &d.spec.as_ref()?.selector;
    let mut parts: Vec<String> = s.match_labels.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            _ => return None, // not a selector the API server would have accepted
        });
    }
    (!parts.is_empty()).then(|| parts.join(","))
}

/// `[prefix...] celery -A <app> worker --queues=<q>[,<extra>...] --concurrency=<n> -n <node>@%h
/// [...]`, as the container command (exec form, so Celery, or a wrapper that execs it, is PID 1
/// and gets SIGTERM for warm shutdown).
pub fn worker_command(w: &WorkerSpec, valid: &ValidSpec) -> Vec<String> {
    let mut cmd = w.command_prefix.clone();
    cmd.extend([
        "celery".to_string(),
        "-A".into(),
        w.app.clone(),
        "worker".into(),
        format!("--queues={}", valid.queues.join(",")),
        format!("--concurrency={}", w.concurrency),
        "-n".into(),
        format!("{}@%h", valid.node_name),
    ]);
    if let Some(p) = w.prefetch_multiplier {
        cmd.push(format!("--prefetch-multiplier={p}"));
    }
    cmd.extend(w.extra_args.iter().cloned());
    cmd
}

fn quantities(m: &BTreeMap<String, IntOrString>) -> Option<BTreeMap<String, Quantity>> {
    if m.is_empty() {
        return None;
    }
    Some(
        m.iter()
            .map(|(k, v)| {
                let q = match v {
                    IntOrString::Int(i) => i.to_string(),
                    IntOrString::String(s) => s.clone(),
                };
                (k.clone(), Quantity(q))
            })
            .collect(),
    )
}

/// The full desired Deployment of `spec.worker` `w`, ready for server-side apply.
pub fn build(tq: &TaskQueue, w: &WorkerSpec, valid: &ValidSpec, replicas: i32) -> Deployment {
    let mut template = valid.pod_template.clone().unwrap_or_default();
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    meta.labels.get_or_insert_with(BTreeMap::new).extend(labels(tq));
    let pod = template.spec.get_or_insert_with(PodSpec::default);

    // Start from a user-supplied `worker` container (volumeMounts, probes, ...) if any.
    let user = pod.containers.iter().position(|c| c.name == CONTAINER).map(|i| pod.containers.remove(i));
    let mut c = user.unwrap_or_default();
    c.name = CONTAINER.into();
    c.image = Some(w.image.clone());
    c.command = Some(worker_command(w, valid));
    // Owned as empty, so args added by hand count as drift and are removed.
    c.args = Some(Vec::new());
    let mut env = vec![EnvVar {
        name: "CELERY_BROKER_URL".into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: tq.spec.broker.url_secret_ref.name.clone(),
                key: tq.spec.broker.url_secret_ref.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }];
    env.extend(c.env.take().unwrap_or_default().into_iter().filter(|e| e.name != "CELERY_BROKER_URL"));
    env.extend(w.env.iter().cloned());
    c.env = Some(env);
    if let Some(r) = &w.resources {
        c.resources = Some(ResourceRequirements {
            requests: quantities(&r.requests),
            limits: quantities(&r.limits),
            ..ResourceRequirements::default()
        });
    }
    pod.containers.insert(0, c);
    pod.termination_grace_period_seconds = Some(w.termination_grace_period_seconds.unwrap_or(DEFAULT_GRACE_SECONDS));

    // A TaskQueue read from the API server always has a name and uid, so always an owner.
    let owners: Vec<OwnerReference> = tq.controller_owner_ref(&()).into_iter().collect();
    Deployment {
        metadata: ObjectMeta {
            name: Some(tq.name_any()),
            namespace: tq.namespace(),
            labels: Some(labels(tq)),
            owner_references: Some(owners),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector { match_labels: Some(selector_labels(tq)), ..LabelSelector::default() },
            template: PodTemplateSpec { metadata: template.metadata, spec: template.spec },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// A hash of everything in `d` (equal Deployments, equal fingerprints, within one process).
pub fn fingerprint(d: &Deployment) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_string(d).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// As [`fingerprint`], replicas left out: what a refused template is remembered by.
pub fn template_fingerprint(d: &Deployment) -> u64 {
    let mut d = d.clone();
    if let Some(spec) = d.spec.as_mut() {
        spec.replicas = None;
    }
    fingerprint(&d)
}

/// The first field the operator sets in `desired` that `observed` does not hold (as a path such
/// as `.spec.template.spec.containers[0].image`), or None when `observed` already is what the
/// operator asks for. Fields someone else added are not drift (server-side apply leaves them);
/// lists of plain values (the command) must match exactly; an empty value the server dropped is
/// no difference; quantities compare by value, as the API server rewrites `0.5` as `500m`.
pub fn drift(observed: &Deployment, desired: &Deployment) -> Option<String> {
    let (Ok(o), Ok(d)) = (serde_json::to_value(observed), serde_json::to_value(desired)) else {
        return Some(String::new());
    };
    difference(&o, &d, String::new())
}

/// When the worker container of `observed` differs from the desired one: a JSON patch that
/// replaces it whole (guarded by the resourceVersion it was computed from). Server-side apply
/// alone cannot repair every hand edit: a field another manager added next to ours (an env
/// `value` beside our `valueFrom`) stays, and the apply is then refused.
pub fn repair_worker(observed: &Deployment, desired: &Deployment) -> Option<Value> {
    let worker = |d: &Deployment| {
        let containers = &d.spec.as_ref()?.template.spec.as_ref()?.containers;
        containers.iter().position(|c| c.name == CONTAINER).map(|i| (i, containers[i].clone()))
    };
    let (_, want) = worker(desired)?;
    let want = serde_json::to_value(&want).ok()?;
    let rv = observed.metadata.resource_version.clone()?;
    let op = match worker(observed) {
        Some((i, have)) => {
            difference(&serde_json::to_value(&have).ok()?, &want, String::new())?;
            json!({"op": "replace", "path": format!("/spec/template/spec/containers/{i}"), "value": want})
        }
        None => json!({"op": "add", "path": "/spec/template/spec/containers/0", "value": want}),
    };
    Some(json!([{"op": "test", "path": "/metadata/resourceVersion", "value": rv}, op]))
}

fn difference(observed: &Value, desired: &Value, path: String) -> Option<String> {
    match desired {
        Value::Object(fields) => fields.iter().find_map(|(k, d)| match observed.get(k) {
            Some(o) => difference(o, d, format!("{path}.{k}")),
            None if is_empty(d) => None,
            None => Some(format!("{path}.{k}")),
        }),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
            let observed = observed.as_array().map_or(&[][..], Vec::as_slice);
            // Keyed lists (containers, env, volumes, ...): each of ours must be there, wherever.
            items.iter().enumerate().find_map(|(i, d)| {
                let found = observed.iter().any(|o| difference(o, d, path.clone()).is_none());
                (!found).then(|| format!("{path}[{i}]"))
            })
        }
        Value::Array(items) => {
            let observed = observed.as_array().map_or(&[][..], Vec::as_slice);
            (observed != items.as_slice()).then_some(path)
        }
        Value::String(d) => match observed.as_str() {
            Some(o) if o == d => None,
            Some(o) if path.contains(".resources.") && quantity::same(o, d) => None,
            _ => Some(path),
        },
        Value::Null => None,
        d => (observed != d).then_some(path),
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// True when `d` is controlled by this TaskQueue (same uid), i.e. ours to manage.
pub fn owned_by(d: &Deployment, tq: &TaskQueue) -> bool {
    controller_uid(d).is_some_and(|uid| tq.meta().uid.as_deref() == Some(uid))
}

/// The object's controller: the owner reference marked `controller` (at most one).
pub fn controller_of(obj: &impl Resource) -> Option<&OwnerReference> {
    obj.meta().owner_references.iter().flatten().find(|o| o.controller == Some(true))
}

/// The uid of the object's controller.
pub fn controller_uid(obj: &impl Resource) -> Option<&str> {
    controller_of(obj).map(|o| o.uid.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::validate;
    use serde_json::json;

    pub fn tq(spec: serde_json::Value) -> TaskQueue {
        serde_json::from_value(json!({
            "apiVersion": "taskqueue.dev/v1alpha1",
            "kind": "TaskQueue",
            "metadata": {"name": "general", "namespace": "prod", "uid": "uid-1", "generation": 1},
            "spec": spec
        }))
        .unwrap()
    }

    fn general() -> TaskQueue {
        tq(json!({
            "queue": "celery",
            "extraQueues": ["reports", "notifications"],
            "broker": {"urlSecretRef": {"name": "celery-broker", "key": "url"}},
            "worker": {
                "image": "example/app:1.0", "app": "app.worker", "concurrency": 3,
                "nodeName": "general-worker", "prefetchMultiplier": 1, "extraArgs": ["--loglevel=INFO"],
                "resources": {"requests": {"cpu": "500m", "memory": 1}, "limits": {"memory": "1Gi"}},
                "env": [{"name": "APP_ENV", "value": "prod"}],
                "terminationGracePeriodSeconds": 600,
                "podTemplate": {
                    "metadata": {"labels": {"team": "data"}},
                    "spec": {"nodeSelector": {"pool": "workers"}, "containers": [{"name": "worker", "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]}, {"name": "sidecar", "image": "proxy:1"}]}
                }
            }
        }))
    }

    #[test]
    fn command_line_is_exactly_the_seed_one() {
        let t = general();
        let v = validate(&t.spec, "general").unwrap();
        assert_eq!(
            worker_command(t.spec.worker.as_ref().unwrap(), &v).join(" "),
            "celery -A app.worker worker --queues=celery,reports,notifications --concurrency=3 -n general-worker@%h --prefetch-multiplier=1 --loglevel=INFO"
        );
        let minimal = tq(
            json!({"queue": "urgent", "broker": {"urlSecretRef": {"name": "b"}}, "worker": {"image": "i", "app": "app.worker"}}),
        );
        let v = validate(&minimal.spec, "urgent-pool").unwrap();
        assert_eq!(
            worker_command(minimal.spec.worker.as_ref().unwrap(), &v).join(" "),
            "celery -A app.worker worker --queues=urgent --concurrency=1 -n urgent-pool@%h"
        );
        let wrapped = tq(json!({"queue": "urgent", "broker": {"urlSecretRef": {"name": "b"}},
            "worker": {"image": "i", "app": "app.worker", "commandPrefix": ["newrelic-admin", "run-program"]}}));
        let v = validate(&wrapped.spec, "urgent").unwrap();
        assert_eq!(
            worker_command(wrapped.spec.worker.as_ref().unwrap(), &v),
            [
                "newrelic-admin",
                "run-program",
                "celery",
                "-A",
                "app.worker",
                "worker",
                "--queues=urgent",
                "--concurrency=1",
                "-n",
                "urgent@%h"
            ],
            "the wrapper first, each word its own element (exec form: no shell in between)"
        );
    }

    #[test]
    fn deployment_is_owned_labelled_and_merged() {
        let t = general();
        let v = validate(&t.spec, "general").unwrap();
        let d = build(&t, t.spec.worker.as_ref().unwrap(), &v, 4);
        assert_eq!(d.metadata.name.as_deref(), Some("general"));
        assert_eq!(d.metadata.namespace.as_deref(), Some("prod"));
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str(), owner.controller),
            ("TaskQueue", "general", "uid-1", Some(true))
        );
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(4));
        let pod_labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert_eq!(pod_labels["app.kubernetes.io/instance"], "general");
        assert_eq!(pod_labels["team"], "data");
        assert_eq!(pod_labels["app.kubernetes.io/managed-by"], "taskqueue-operator");
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.termination_grace_period_seconds, Some(600));
        assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "workers");
        assert_eq!(pod.containers.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["worker", "sidecar"]);
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("example/app:1.0"));
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, "/cfg");
        let env = c.env.as_ref().unwrap();
        assert_eq!(env[0].name, "CELERY_BROKER_URL");
        assert_eq!(env[0].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().name, "celery-broker");
        assert_eq!(env[1].name, "APP_ENV");
        let res = c.resources.as_ref().unwrap();
        assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "500m");
        assert_eq!(res.requests.as_ref().unwrap()["memory"].0, "1");
        assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "1Gi");
    }

    #[test]
    fn fingerprints_follow_the_template_and_the_replicas() {
        let t = general();
        let v = validate(&t.spec, "general").unwrap();
        assert_eq!(
            fingerprint(&build(&t, t.spec.worker.as_ref().unwrap(), &v, 1)),
            fingerprint(&build(&t, t.spec.worker.as_ref().unwrap(), &v, 1))
        );
        assert_ne!(
            fingerprint(&build(&t, t.spec.worker.as_ref().unwrap(), &v, 1)),
            fingerprint(&build(&t, t.spec.worker.as_ref().unwrap(), &v, 2))
        );
        assert_eq!(
            template_fingerprint(&build(&t, t.spec.worker.as_ref().unwrap(), &v, 1)),
            template_fingerprint(&build(&t, t.spec.worker.as_ref().unwrap(), &v, 9))
        );
        let mut t2 = general();
        t2.spec.worker.as_mut().unwrap().concurrency = 4;
        let v2 = validate(&t2.spec, "general").unwrap();
        assert_ne!(
            template_fingerprint(&build(&t, t.spec.worker.as_ref().unwrap(), &v, 1)),
            template_fingerprint(&build(&t2, t2.spec.worker.as_ref().unwrap(), &v2, 1))
        );
    }

    /// What the API server answers for `d`: defaults added, quantities canonical, empty lists dropped.
    fn as_stored(d: &Deployment) -> serde_json::Value {
        let mut v = serde_json::to_value(d).unwrap();
        v["metadata"]["generation"] = json!(4);
        v["metadata"]["managedFields"] = json!([{"manager": "taskqueue-operator"}]);
        v["spec"]["strategy"] = json!({"type": "RollingUpdate"});
        let c = &mut v["spec"]["template"]["spec"]["containers"][0];
        c["imagePullPolicy"] = json!("IfNotPresent");
        c["resources"]["requests"]["cpu"] = json!("0.5"); // written as 500m
        c.as_object_mut().unwrap().remove("args");
        v["spec"]["template"]["spec"]["containers"].as_array_mut().unwrap().reverse();
        v
    }

    #[test]
    fn drift_ignores_what_the_server_adds_and_finds_every_managed_field() {
        let t = general();
        let v = validate(&t.spec, "general").unwrap();
        let desired = build(&t, t.spec.worker.as_ref().unwrap(), &v, 3);
        let stored = as_stored(&desired);
        let parse = |v: serde_json::Value| serde_json::from_value::<Deployment>(v).unwrap();
        assert_eq!(drift(&parse(stored.clone()), &desired), None, "defaults, canonical quantities, order");
        let edits: &[(&str, serde_json::Value, &str)] = &[
            ("/spec/replicas", json!(7), ".spec.replicas"),
            ("/spec/template/spec/containers/1/image", json!("evil:1"), ".spec.template.spec.containers[0]"),
            ("/spec/template/spec/containers/1/command/3", json!("beat"), ".spec.template.spec.containers[0]"),
            ("/spec/template/spec/containers/1/args", json!(["--pool=solo"]), ".spec.template.spec.containers[0]"),
            ("/spec/template/spec/containers/1/env/1/value", json!("staging"), ".spec.template.spec.containers[0]"),
            (
                "/spec/template/spec/containers/1/resources/limits/memory",
                json!("2Gi"),
                ".spec.template.spec.containers[0]",
            ),
            (
                "/spec/template/spec/terminationGracePeriodSeconds",
                json!(1),
                ".spec.template.spec.terminationGracePeriodSeconds",
            ),
        ];
        for (pointer, value, want) in edits {
            let mut edited = stored.clone();
            let (parent, last) = pointer.rsplit_once('/').unwrap();
            match edited.pointer_mut(parent).unwrap_or_else(|| panic!("{pointer}")) {
                serde_json::Value::Array(a) => a[last.parse::<usize>().unwrap()] = value.clone(),
                other => other[last] = value.clone(),
            }
            assert_eq!(drift(&parse(edited), &desired).as_deref(), Some(*want), "{pointer}");
        }
        let mut extra = stored.clone();
        extra["spec"]["template"]["spec"]["containers"][1]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "X", "value": "1"}));
        assert_eq!(drift(&parse(extra), &desired), None, "what others add is theirs");
    }

    #[test]
    fn ownership_is_by_uid() {
        let t = general();
        let v = validate(&t.spec, "general").unwrap();
        let d = build(&t, t.spec.worker.as_ref().unwrap(), &v, 1);
        assert!(owned_by(&d, &t));
        let mut other = general();
        other.metadata.uid = Some("uid-2".into());
        assert!(!owned_by(&d, &other));
        assert!(!owned_by(&Deployment::default(), &t));
    }
}
