//! Reconcile scenarios against a mocked API server (tower-test): every request the reconciler
//! makes is checked in order, and a steady state must make none.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use http::{Request, Response};
use kube::client::Body;
use kube::runtime::reflector;
use kube::runtime::watcher;
use kube::Client;
use serde_json::{json, Value};
use taskqueue_operator::controller::cached::CachedDeployment;
use taskqueue_operator::controller::events::EventPublisher;
use taskqueue_operator::controller::poller::BrokerState;
use taskqueue_operator::controller::{reconcile, Context, SecretCache};
use taskqueue_operator::crd::TaskQueue;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

struct Harness {
    ctx: Arc<Context>,
    handle: Handle,
    deployments: reflector::store::Writer<CachedDeployment>,
}

fn harness() -> Harness {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (store, writer) = reflector::store::<CachedDeployment>();
    let ctx = Arc::new(Context {
        client: client.clone(),
        events: EventPublisher::new(client.clone(), "taskqueue-operator", None),
        deployments: store,
        routes_configmap: "celery-task-routes".into(),
        broker: Arc::new(BrokerState::new(Duration::from_secs(1))),
        memory: Mutex::default(),
        secrets: SecretCache::new(client, Duration::from_secs(3600)),
        metrics: Default::default(),
        routes: Default::default(),
        leading: tokio::sync::watch::channel(true).1,
        dashboard: Default::default(),
        pod_policy: Default::default(),
        broker_allow: Default::default(),
        status_manager: "taskqueue-operator@test/tq".into(),
        started: 0,
    });
    Harness { ctx, handle, deployments: writer }
}

fn taskqueue(spec: Value) -> TaskQueue {
    serde_json::from_value(json!({
        "apiVersion": "taskqueue.dev/v1alpha1",
        "kind": "TaskQueue",
        "metadata": {"name": "ai", "namespace": "prod", "uid": "tq-uid", "generation": 3},
        "spec": spec
    }))
    .unwrap()
}

fn ai_spec() -> Value {
    json!({
        "queue": "ai_processing",
        "routes": [{"pattern": "app.worker.tasks.ai_tasks.*"}],
        "broker": {"urlSecretRef": {"name": "celery-broker", "key": "url"}},
        "worker": {"image": "example/app:1", "app": "app.worker", "concurrency": 2, "nodeName": "ai-worker"},
        "scaling": {"minReplicas": 1, "maxReplicas": 5}
    })
}

/// Receive the next request, check method and path, answer with `status` + `body`;
/// returns the request body as JSON (Null when empty).
async fn expect(handle: &mut Handle, method: &str, path: &str, status: u16, body: Value) -> Value {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("no request arrived; expected {method} {path}"))
        .expect("service open");
    assert_eq!(req.method().as_str(), method, "method of {}", req.uri());
    assert_eq!(req.uri().path(), path);
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let sent = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    send.send_response(
        Response::builder().status(status).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap(),
    );
    sent
}

/// What the API server answers to a status patch (the mock's answer is not used for decisions).
fn tq_json() -> Value {
    serde_json::to_value(taskqueue(ai_spec())).unwrap()
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

fn broker_secret() -> Value {
    // "redis://127.0.0.1:1/0" base64-encoded
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "celery-broker", "namespace": "prod"}, "data": {"url": "cmVkaXM6Ly8xMjcuMC4wLjE6MS8w"}})
}

/// The next request must be an Event with `reason`; returns it.
async fn expect_event(handle: &mut Handle, reason: &str) -> Value {
    let event = expect(handle, "POST", "/apis/events.k8s.io/v1/namespaces/prod/events", 201, json!({})).await;
    assert_eq!(event["reason"], reason, "{event}");
    event
}

/// The next request must be the status patch; returns the patch body.
async fn expect_status(handle: &mut Handle) -> Value {
    expect(handle, "PATCH", "/apis/taskqueue.dev/v1alpha1/namespaces/prod/taskqueues/ai/status", 200, tq_json()).await
}

/// Condition `type_` of a status patch body.
fn condition(patch: &Value, type_: &str) -> Value {
    let conds = patch["status"]["conditions"].as_array().expect("conditions");
    conds.iter().find(|c| c["type"] == type_).unwrap_or_else(|| panic!("no {type_} in {conds:?}")).clone()
}

/// A reconcile that is expected to make no request at all: it must finish on its own (a request
/// nobody answers would hang it).
async fn within_5s<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f).await.expect("reconcile made a request nobody answered")
}

fn no_more_requests(handle: &mut Handle) {
    if let Some(Some((req, _))) = handle.next_request().now_or_never() {
        panic!("unexpected request {} {}", req.method(), req.uri());
    }
}

/// The first reconcile of a TaskQueue reads its Secret, registers what the poller must read and
/// stops there: nothing is decided (or written) before the first broker read. Then the poller
/// reads: 127.0.0.1:1 (the Secret's URL) refuses, so the next reconcile sees an unreadable
/// broker, and first reads the Secret again (a refused broker may mean a rotated Secret).
async fn first_read_fails(h: &mut Harness, tq: &Arc<TaskQueue>) {
    let run = tokio::spawn(reconcile(tq.clone(), h.ctx.clone()));
    expect(&mut h.handle, "GET", "/api/v1/namespaces/prod/secrets/celery-broker", 200, broker_secret()).await;
    run.await.unwrap().unwrap();
    no_more_requests(&mut h.handle);
    for endpoint in h.ctx.broker.endpoints() {
        let (changed, ok) = h.ctx.broker.read_endpoint(&endpoint).await;
        assert!(!ok && changed.len() == 1, "the read fails and is this TaskQueue's first");
    }
}

#[tokio::test]
async fn nothing_is_decided_or_written_before_the_first_broker_read() {
    let mut h = harness();
    let tq = Arc::new(taskqueue(ai_spec()));
    let run = tokio::spawn(reconcile(tq.clone(), h.ctx.clone()));
    expect(&mut h.handle, "GET", "/api/v1/namespaces/prod/secrets/celery-broker", 200, broker_secret()).await;
    let action = run.await.unwrap().unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(5)),
        "a look later, should the read not wake it"
    );
    no_more_requests(&mut h.handle);
    assert_eq!(h.ctx.broker.endpoints().len(), 1, "the poller has the target to read");
}

#[tokio::test]
async fn create_then_steady_state_makes_no_writes() {
    let mut h = harness();
    let tq = Arc::new(taskqueue(ai_spec()));
    first_read_fails(&mut h, &tq).await;
    let run = tokio::spawn(reconcile(tq.clone(), h.ctx.clone()));

    expect(&mut h.handle, "GET", "/api/v1/namespaces/prod/secrets/celery-broker", 200, broker_secret()).await;
    expect(&mut h.handle, "GET", "/apis/apps/v1/namespaces/prod/deployments/ai", 404, not_found()).await;
    let (req, send) = h.handle.next_request().await.unwrap();
    assert_eq!((req.method().as_str(), req.uri().path()), ("PATCH", "/apis/apps/v1/namespaces/prod/deployments/ai"));
    assert!(req.uri().query().unwrap().contains("fieldManager=taskqueue-operator"), "{:?}", req.uri());
    assert!(req.uri().query().unwrap().contains("force=true"));
    let applied: Value = serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    send.send_response(Response::builder().body(Body::from(serde_json::to_vec(&applied).unwrap())).unwrap());
    assert_eq!(applied["spec"]["replicas"], 1, "created at minReplicas while the broker cannot be read");
    assert_eq!(
        applied["spec"]["template"]["spec"]["containers"][0]["command"],
        json!([
            "celery",
            "-A",
            "app.worker",
            "worker",
            "--queues=ai_processing",
            "--concurrency=2",
            "-n",
            "ai-worker@%h"
        ])
    );
    assert_eq!(applied["metadata"]["ownerReferences"][0]["uid"], "tq-uid");

    expect_event(&mut h.handle, "BrokerUnreachable").await;
    expect_event(&mut h.handle, "Created").await;
    let status_patch = expect_status(&mut h.handle).await;
    run.await.unwrap().unwrap();
    let status = &status_patch["status"];
    assert_eq!(status["desiredReplicas"], 1);
    assert_eq!(status["observedGeneration"], 3);
    assert_eq!(condition(&status_patch, "SpecValid")["status"], "True");
    assert_eq!(condition(&status_patch, "BrokerReachable")["status"], "False");

    // Steady state: the Deployment is in the cache, the status is what we wrote.
    let mut deployed: CachedDeployment = serde_json::from_value(applied).unwrap();
    deployed.metadata.resource_version = Some("1".into());
    h.deployments.apply_watcher_event(&watcher::Event::Apply(deployed));
    let mut tq2 = taskqueue(ai_spec());
    tq2.status = Some(serde_json::from_value(status.clone()).unwrap());
    within_5s(reconcile(Arc::new(tq2), h.ctx.clone())).await.unwrap();
    no_more_requests(&mut h.handle);
}

#[tokio::test]
async fn foreign_deployment_is_never_taken_over() {
    let mut h = harness();
    let tq = Arc::new(taskqueue(ai_spec()));
    first_read_fails(&mut h, &tq).await;
    let run = tokio::spawn(reconcile(tq, h.ctx.clone()));
    expect(&mut h.handle, "GET", "/api/v1/namespaces/prod/secrets/celery-broker", 200, broker_secret()).await;
    let foreign = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "ai", "namespace": "prod", "uid": "someone-else"},
        "spec": {"replicas": 7, "selector": {"matchLabels": {"app": "legacy"}}, "template": {"metadata": {"labels": {"app": "legacy"}}, "spec": {"containers": [{"name": "x", "image": "legacy"}]}}}
    });
    expect(&mut h.handle, "GET", "/apis/apps/v1/namespaces/prod/deployments/ai", 200, foreign).await;
    // No PATCH of the Deployment: the next requests are the warning events and the status.
    expect_event(&mut h.handle, "BrokerUnreachable").await;
    let event = expect_event(&mut h.handle, "DeploymentConflict").await;
    assert_eq!(event["type"], "Warning");
    let status = expect_status(&mut h.handle).await;
    run.await.unwrap().unwrap();
    let owned = condition(&status, "DeploymentOwned");
    assert_eq!(owned["status"], "False");
    assert!(owned["message"].as_str().unwrap().contains("already exists"), "{owned}");
    no_more_requests(&mut h.handle);
}

#[tokio::test]
async fn invalid_spec_only_touches_its_status() {
    let mut h = harness();
    let mut spec = ai_spec();
    spec["scaling"] = json!({"minReplicas": 4, "maxReplicas": 2, "pollInterval": "soon"});
    let tq = Arc::new(taskqueue(spec.clone()));
    let run = tokio::spawn(reconcile(tq, h.ctx.clone()));
    // No Secret read, no Deployment read or write: straight to the event and the status.
    let event = expect_event(&mut h.handle, "InvalidSpec").await;
    let note = event["note"].as_str().unwrap();
    assert!(note.contains("spec.scaling.minReplicas: 4 must not exceed spec.scaling.maxReplicas (2)"), "{note}");
    assert!(note.contains("spec.scaling.pollInterval"), "{note}");
    let status = expect_status(&mut h.handle).await;
    run.await.unwrap().unwrap();
    let valid = condition(&status, "SpecValid");
    assert_eq!((valid["status"].as_str(), valid["reason"].as_str()), (Some("False"), Some("InvalidSpec")));
    no_more_requests(&mut h.handle);

    // Reconciled again unchanged: no second event, no status write.
    let mut again = taskqueue(spec);
    again.status = Some(serde_json::from_value(status["status"].clone()).unwrap());
    within_5s(reconcile(Arc::new(again), h.ctx.clone())).await.unwrap();
    no_more_requests(&mut h.handle);
}

/// A Deployment of ours at `replicas` (its template differs from the desired one, so it is patched).
fn owned_deployment(replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "ai", "namespace": "prod", "annotations": {}, "ownerReferences": [{"apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue", "name": "ai", "uid": "tq-uid", "controller": true}]},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"a": "b"}}, "template": {"spec": {"containers": []}}}
    })
}

/// The rest of a reconcile without broker data, for an existing Deployment at 3 replicas: it is
/// applied at 3 (no decision on missing data), one Warning `reason`; returns the status patch.
async fn frozen_at_3(handle: &mut Handle, reason: &str) -> Value {
    expect(handle, "GET", "/apis/apps/v1/namespaces/prod/deployments/ai", 200, owned_deployment(3)).await;
    let applied =
        expect(handle, "PATCH", "/apis/apps/v1/namespaces/prod/deployments/ai", 200, owned_deployment(3)).await;
    assert_eq!(applied["spec"]["replicas"], 3, "replicas stay where they are without broker data");
    expect_event(handle, reason).await;
    expect_status(handle).await
}

#[tokio::test]
async fn the_ca_bundle_comes_from_its_secret_and_a_wrong_one_is_named() {
    // caSecretRef names a Secret without the key: the condition names the field to fix.
    let mut h = harness();
    let mut spec = ai_spec();
    spec["broker"]["caSecretRef"] = json!({"name": "redis-ca"});
    let tq = Arc::new(taskqueue(spec.clone()));
    let run = tokio::spawn(reconcile(tq, h.ctx.clone()));
    expect(&mut h.handle, "GET", "/api/v1/namespaces/prod/secrets/celery-broker", 200, broker_secret()).await;
    let ca = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis-ca"}, "data": {"tls.crt": ""}});
    expect(&mut h.handle, "GET", "/api/v1/namespaces/prod/secrets/redis-ca", 200, ca).await;
    let status = frozen_at_3(&mut h.handle, "BrokerSecretMissing").await;
    run.await.unwrap().unwrap();
    let c = condition(&status, "BrokerReachable");
    assert_eq!(c["status"], "False");
    let msg = c["message"].as_str().unwrap();
    assert!(
        msg.contains("Secret prod/redis-ca has no key \"ca.crt\"") && msg.contains("spec.broker.caSecretRef.key"),
        "{msg}"
    );

    // A CA for a plain redis:// URL is a mistake, not silently ignored.
    let mut h = harness();
    let ca =
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis-ca"}, "data": {"ca.crt": "LS0tLS0="}});
    let run = tokio::spawn(reconcile(Arc::new(taskqueue(spec)), h.ctx.clone()));
    expect(&mut h.handle, "GET", "/api/v1/namespaces/prod/secrets/celery-broker", 200, broker_secret()).await;
    expect(&mut h.handle, "GET", "/api/v1/namespaces/prod/secrets/redis-ca", 200, ca).await;
    let status = frozen_at_3(&mut h.handle, "InvalidBrokerURL").await;
    run.await.unwrap().unwrap();
    let msg = condition(&status, "BrokerReachable")["message"].as_str().unwrap().to_string();
    assert!(msg.contains("caSecretRef is set but the broker URL is not rediss://"), "{msg}");
}

#[tokio::test]
async fn missing_secret_is_reported_and_nothing_scales_on_missing_data() {
    let mut h = harness();
    let tq = Arc::new(taskqueue(ai_spec()));
    let run = tokio::spawn(reconcile(tq, h.ctx.clone()));
    expect(&mut h.handle, "GET", "/api/v1/namespaces/prod/secrets/celery-broker", 404, not_found()).await;
    let status = frozen_at_3(&mut h.handle, "BrokerSecretMissing").await;
    run.await.unwrap().unwrap();
    let c = condition(&status, "BrokerReachable");
    assert_eq!(c["status"], "False");
    assert!(
        c["message"].as_str().unwrap().contains("Secret prod/celery-broker (spec.broker.urlSecretRef.name) not found"),
        "{c}"
    );
}

#[tokio::test]
async fn a_deployment_the_api_server_refuses_becomes_a_condition_and_one_event() {
    let mut h = harness();
    let tq = Arc::new(taskqueue(ai_spec()));
    first_read_fails(&mut h, &tq).await;
    let run = tokio::spawn(reconcile(tq, h.ctx.clone()));
    expect(&mut h.handle, "GET", "/api/v1/namespaces/prod/secrets/celery-broker", 200, broker_secret()).await;
    expect(&mut h.handle, "GET", "/apis/apps/v1/namespaces/prod/deployments/ai", 200, owned_deployment(3)).await;
    let server_says = "Deployment.apps \"ai\" is invalid: spec.template.spec.containers[0].image: Required value";
    let refused = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Invalid", "code": 422, "message": server_says});
    expect(&mut h.handle, "PATCH", "/apis/apps/v1/namespaces/prod/deployments/ai", 422, refused).await;
    expect_event(&mut h.handle, "BrokerUnreachable").await;
    let event = expect_event(&mut h.handle, "DeploymentRejected").await;
    assert_eq!(event["type"], "Warning");
    assert!(event["note"].as_str().unwrap().contains(server_says), "{event}");
    let status = expect_status(&mut h.handle).await;
    run.await.unwrap().unwrap();
    let ready = condition(&status, "Ready");
    assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some("DeploymentRejected")));
    assert!(ready["message"].as_str().unwrap().contains(server_says), "{ready}");
    assert_eq!(status["status"]["desiredReplicas"], 3, "the Deployment stays as it was");
    no_more_requests(&mut h.handle);

    // Reconciled again at once: the refused template is not sent again, no second event, and the
    // status is already what it should be. (The Deployment is read whole: this process never
    // wrote it, and the watch cache keeps no pod template to compare.)
    let mut cached: CachedDeployment = serde_json::from_value(owned_deployment(3)).unwrap();
    cached.metadata.resource_version = Some("1".into());
    h.deployments.apply_watcher_event(&watcher::Event::Apply(cached));
    let mut again = taskqueue(ai_spec());
    again.status = Some(serde_json::from_value(status["status"].clone()).unwrap());
    let run = tokio::spawn(reconcile(Arc::new(again), h.ctx.clone()));
    expect(&mut h.handle, "GET", "/apis/apps/v1/namespaces/prod/deployments/ai", 200, owned_deployment(3)).await;
    within_5s(run).await.unwrap().unwrap();
    no_more_requests(&mut h.handle);
}

/// A Secret cache on a mock API server; the cached broker URL Secret read once through it.
async fn cache_with_secret(
    ttl: Duration,
) -> (Arc<SecretCache>, tower_test::mock::Handle<Request<Body>, Response<Body>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let cache = Arc::new(SecretCache::new(Client::new(service, "default"), ttl));
    let r: taskqueue_operator::crd::SecretKeyRef = serde_json::from_value(json!({"name": "celery-broker"})).unwrap();
    let get = tokio::spawn({
        let cache = cache.clone();
        async move { cache.url("prod", &r, None).await }
    });
    expect(&mut handle, "GET", "/api/v1/namespaces/prod/secrets/celery-broker", 200, broker_secret()).await;
    assert_eq!(get.await.unwrap().unwrap(), "redis://127.0.0.1:1/0");
    (cache, handle)
}

#[tokio::test]
async fn secrets_in_use_are_read_again_when_due_and_a_change_is_reported() {
    let in_use: HashSet<(String, String)> = [("prod".to_string(), "celery-broker".to_string())].into();
    // Fresh (an hour's cache): nothing read, nothing changed. No clock in the test: a cache of
    // an hour is fresh, one of zero always due.
    let (cache, mut handle) = cache_with_secret(Duration::from_secs(3600)).await;
    assert!(within_5s(cache.refresh(&in_use)).await.is_empty());
    no_more_requests(&mut handle);

    // Due and unchanged: one GET, nothing to report.
    let (cache, mut handle) = cache_with_secret(Duration::ZERO).await;
    let refresh = tokio::spawn({
        let (cache, in_use) = (cache.clone(), in_use.clone());
        async move { cache.refresh(&in_use).await }
    });
    expect(&mut handle, "GET", "/api/v1/namespaces/prod/secrets/celery-broker", 200, broker_secret()).await;
    assert!(refresh.await.unwrap().is_empty(), "same value");
    assert_eq!(cache.len(), 1);

    // Due and rotated: reported, and the stale copy is gone (the reconcile reads the new one).
    let refresh = tokio::spawn({
        let (cache, in_use) = (cache.clone(), in_use.clone());
        async move { cache.refresh(&in_use).await }
    });
    let mut rotated = broker_secret();
    rotated["data"]["url"] = json!("cmVkaXM6Ly8xMjcuMC4wLjE6Mi8w"); // redis://127.0.0.1:2/0
    expect(&mut handle, "GET", "/api/v1/namespaces/prod/secrets/celery-broker", 200, rotated).await;
    assert_eq!(refresh.await.unwrap(), [("prod".to_string(), "celery-broker".to_string())]);
    assert!(cache.is_empty());

    // Not in use any more: dropped without a read.
    let get = tokio::spawn({
        let cache = cache.clone();
        let r: taskqueue_operator::crd::SecretKeyRef =
            serde_json::from_value(json!({"name": "celery-broker"})).unwrap();
        async move { cache.url("prod", &r, None).await }
    });
    expect(&mut handle, "GET", "/api/v1/namespaces/prod/secrets/celery-broker", 200, broker_secret()).await;
    get.await.unwrap().unwrap();
    assert!(within_5s(cache.refresh(&HashSet::new())).await.is_empty());
    assert!(cache.is_empty(), "unused Secrets are dropped");
    no_more_requests(&mut handle);
}
