//! The CRD's CEL `x-kubernetes-validations` rules and schema bounds, checked on a modern API
//! server. The local test API server (1.20) has no CEL and drops the rules, so this test starts
//! its own one with `../shared/tools/modern-apiserver.sh` (private state dir, free ports),
//! installs `crd::crd()`, and checks that every invalid TaskQueue below is rejected with HTTP 422
//! and the matching message while the seed TaskQueues are accepted. Without `../shared` (a plain
//! clone) the test cannot run: it records itself as skipped (`support::skipped`), which
//! `make test` counts and prints as skipped, never as passed.

mod support;

use std::path::Path;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ApiResource, DynamicObject, PostParams};
use kube::Api;
use serde_json::{json, Value};
use support::modern::{install_crd, script, ModernApiServer};
use taskqueue_operator::crd::TaskQueue;

const NS: &str = "cel-rules";

/// A TaskQueue that passes every rule; each case below breaks exactly one thing in its spec.
fn valid(name: &str) -> Value {
    json!({
        "apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue",
        "metadata": {"name": name},
        "spec": {
            "queue": "celery",
            "extraQueues": ["reports"],
            "routes": [{"pattern": "app.tasks.reports.*", "queue": "reports"}],
            "broker": {"urlSecretRef": {"name": "celery-broker"}},
            "worker": {"image": "example/celery-app:1.0", "app": "app.worker"},
            "scaling": {"minReplicas": 1, "maxReplicas": 3}
        }
    })
}

/// (object name, change to a valid spec, substring of the expected 422 message)
type Case = (&'static str, fn(&mut Value), &'static str);

const INVALID: &[Case] = &[
    // CEL rules (src/crd.rs CEL_RULES)
    (
        "worker-and-scale-target",
        |s| s["scaleTargetRef"] = json!({"name": "app-worker"}),
        "exactly one of spec.worker (a worker Deployment the operator writes) and spec.scaleTargetRef",
    ),
    (
        "neither-worker-nor-scale-target",
        |s| {
            s.as_object_mut().unwrap().remove("worker");
        },
        "exactly one of spec.worker (a worker Deployment the operator writes) and spec.scaleTargetRef",
    ),
    (
        "min-above-max",
        |s| s["scaling"] = json!({"minReplicas": 5, "maxReplicas": 2}),
        "spec.scaling.minReplicas must not exceed spec.scaling.maxReplicas",
    ),
    (
        "route-to-foreign-queue",
        |s| s["routes"] = json!([{"pattern": "app.tasks.x.*", "queue": "elsewhere"}]),
        "spec.routes[].queue must be spec.queue or one of spec.extraQueues",
    ),
    (
        "extra-repeats-queue",
        |s| s["extraQueues"] = json!(["reports", "celery"]),
        "spec.extraQueues must not repeat spec.queue",
    ),
    (
        "duplicate-extra-queues",
        |s| s["extraQueues"] = json!(["reports", "reports"]),
        "spec.extraQueues must not contain duplicates",
    ),
    (
        "duplicate-priority-steps",
        |s| s["broker"]["transportOptions"] = json!({"prioritySteps": [0, 3, 3, 9]}),
        "spec.broker.transportOptions.prioritySteps must not contain duplicates",
    ),
    (
        "fallback-outside-bounds",
        |s| s["scaling"] = json!({"minReplicas": 1, "maxReplicas": 3, "fallbackReplicas": 4}),
        "spec.scaling.fallbackReplicas must lie within [minReplicas, maxReplicas]",
    ),
    // OpenAPI schema bounds
    (
        "zero-max-step",
        |s| s["scaling"]["scaleDown"] = json!({"maxStep": 0}),
        "spec.scaling.scaleDown.maxStep in body should be greater than or equal to 1",
    ),
    (
        "zero-concurrency",
        |s| s["worker"]["concurrency"] = json!(0),
        "spec.worker.concurrency in body should be greater than or equal to 1",
    ),
    (
        "empty-queue",
        |s| {
            s["queue"] = json!("");
            s["extraQueues"] = json!([]);
            s["routes"] = json!([]);
        },
        "spec.queue in body should be at least 1 chars long",
    ),
    (
        "long-pattern",
        |s| s["routes"][0]["pattern"] = json!("a".repeat(254)),
        "spec.routes[0].pattern: Too long: may not be more than 253 bytes",
    ),
    (
        "poll-interval-above-1h",
        |s| s["scaling"]["pollInterval"] = json!("2h"),
        "spec.scaling.pollInterval must lie within [100ms, 1h]",
    ),
    (
        "poll-interval-below-100ms",
        |s| s["scaling"]["pollInterval"] = json!("50ms"),
        "spec.scaling.pollInterval must lie within [100ms, 1h]",
    ),
    (
        "fallback-after-above-24h",
        |s| s["scaling"]["fallbackAfter"] = json!("25h"),
        "spec.scaling.fallbackAfter must be at most 24h",
    ),
    (
        "eta-horizon-above-24h",
        |s| s["scaling"]["etaHorizon"] = json!("25h"),
        "spec.scaling.etaHorizon must be at most 24h",
    ),
    (
        "window-above-24h",
        |s| s["scaling"]["scaleDown"] = json!({"stabilizationWindow": "24h1s"}),
        "spec.scaling.scaleDown.stabilizationWindow must be at most 24h",
    ),
    (
        "duration-string-too-long",
        |s| s["scaling"]["pollInterval"] = json!("1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s"),
        "spec.scaling.pollInterval: Too long",
    ),
    ("queue-control-character", |s| s["queue"] = json!("q\u{7}"), "spec.queue in body should match"),
];

#[tokio::test]
#[ignore = "needs ../shared/tools/modern-apiserver.sh: make test"]
async fn cel_rules_reject_invalid_taskqueues_and_accept_the_seed() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(script) = script() else {
        support::skipped(
            "cel_rules_reject_invalid_taskqueues_and_accept_the_seed",
            "../shared/tools/modern-apiserver.sh not present",
        );
        return;
    };
    let server = ModernApiServer::start(script);
    let client = server.client().await;
    install_crd(&client).await;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap())
        .await
        .expect("create namespace");
    let taskqueues: Api<DynamicObject> = Api::namespaced_with(client, NS, &ApiResource::erase::<TaskQueue>(&()));
    let create = |v: Value| {
        let api = taskqueues.clone();
        async move {
            let obj: DynamicObject = serde_json::from_value(v).unwrap();
            api.create(&PostParams::default(), &obj).await
        }
    };

    create(valid("baseline")).await.expect("the baseline of the invalid cases is valid");
    let mut target = valid("scale-target");
    target["spec"].as_object_mut().unwrap().remove("worker");
    target["spec"]["scaleTargetRef"] = json!({"name": "app-worker", "container": "app"});
    create(target).await.expect("a TaskQueue that scales an existing Deployment is valid");

    let mut failures = Vec::new();
    for (name, break_spec, want) in INVALID {
        let mut obj = valid(name);
        break_spec(&mut obj["spec"]);
        match create(obj).await {
            Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains(want) => {
                println!("ok: {name} rejected: {}", s.message);
            }
            Err(kube::Error::Api(s)) => {
                failures.push(format!("{name}: want 422 containing {want:?}, got {}: {}", s.code, s.message))
            }
            Err(e) => failures.push(format!("{name}: {e}")),
            Ok(_) => failures.push(format!("{name}: accepted, want 422 {want:?}")),
        }
    }

    let seed = std::fs::read_to_string(repo.join("deploy/examples/seed.yaml")).unwrap();
    let mut accepted = 0;
    for doc in serde_yaml::Deserializer::from_str(&seed) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        if v["kind"] != "TaskQueue" {
            continue; // the broker Secret
        }
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        match create(v).await {
            Ok(_) => {
                println!("ok: seed TaskQueue {name} accepted");
                accepted += 1;
            }
            Err(e) => failures.push(format!("seed TaskQueue {name} rejected: {e}")),
        }
    }

    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
    assert_eq!(accepted, 4, "seed.yaml should hold 4 TaskQueues");
}
