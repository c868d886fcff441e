//! Leader election against a mocked API server (tower-test), with short durations: the paths
//! two real processes rarely show — a leader whose renewals fail steps down before its Lease
//! could expire, a standby waits out a Lease that stays unchanged, a clean shutdown releases it.

use std::time::Duration;

// The paused tokio clock (the election runs on it too): time moves only while every task
// waits, so what is checked is the order of the election's steps, not the machine's speed.
use tokio::time::Instant;

use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use taskqueue_operator::leader::{self, Elector, LeaseConfig};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/taskqueue-operator";

fn config() -> LeaseConfig {
    LeaseConfig {
        lease_duration: Duration::from_millis(1500),
        renew_deadline: Duration::from_millis(600),
        retry_period: Duration::from_millis(100),
        ..LeaseConfig::new("ops", "me")
    }
}

fn lease(holder: &str, version: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "taskqueue-operator", "namespace": "ops", "resourceVersion": version},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 1, "leaseTransitions": 4}
    })
}

/// Answer the next request; returns (method, path, body sent).
async fn answer(handle: &mut Handle, status: u16, body: Value) -> (String, String, Value) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("a request")
        .expect("service open");
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let sent = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    send.send_response(
        Response::builder().status(status).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap(),
    );
    (method, path, sent)
}

fn status(code: u16) -> Value {
    let reason = if code == 404 { "NotFound" } else { "InternalError" };
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "mock", "reason": reason, "code": code})
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_renewals_fail_steps_down_before_its_lease_can_expire() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (tx, mut leading) = tokio::sync::watch::channel(false);
    let cfg = config();
    let run = tokio::spawn(leader::run(Elector::new(Client::new(service, "default"), cfg.clone()), tx));

    assert_eq!(answer(&mut handle, 404, status(404)).await.0, "GET");
    let (method, _, created) = answer(&mut handle, 201, lease("me", "1")).await;
    assert_eq!((method.as_str(), &created["spec"]["holderIdentity"]), ("POST", &json!("me")));
    let renewed_at = Instant::now(); // the last renewal anyone saw
    leading.changed().await.unwrap();
    assert!(*leading.borrow_and_update(), "leading after creating the Lease");

    // From now on the API server fails every request.
    let stepped_down = async {
        while leading.changed().await.is_ok() {
            if !*leading.borrow_and_update() {
                return renewed_at.elapsed();
            }
        }
        panic!("election ended");
    };
    // A count bounds it too: a leader that retries without waiting never lets the paused clock
    // move, so no deadline would ever come.
    let failing = async {
        for _ in 0..1000 {
            answer(&mut handle, 500, status(500)).await;
        }
        panic!("still leading after 1000 failed renewals");
    };
    let steps_down = async {
        tokio::select! { d = stepped_down => d, _ = failing => unreachable!() }
    };
    let after = tokio::time::timeout(Duration::from_secs(30), steps_down).await.expect("stepped down within 30 s");
    // Not before the renew deadline, and well before a standby could take over.
    assert!(after >= cfg.renew_deadline, "stepped down after {after:?}");
    assert!(after < cfg.lease_duration, "still leading {after:?} after the last renewal");
    run.abort();
}

#[tokio::test(start_paused = true)]
async fn a_standby_takes_a_lease_only_once_it_stayed_unchanged_for_its_duration() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (tx, mut leading) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(leader::run(Elector::new(Client::new(service, "default"), config()), tx));

    // Held by "other", renewed (new resourceVersion) for a while: no attempt to take it.
    for version in 1..=8 {
        let (method, path, _) = answer(&mut handle, 200, lease("other", &version.to_string())).await;
        assert_eq!((method.as_str(), path.as_str()), ("GET", LEASE));
    }
    // Then it stays unchanged: the standby waits its 1 s duration (from the first sight of that
    // record), then replaces it, guarded by the resourceVersion it read.
    let unchanged = Instant::now();
    let taken = loop {
        let (method, _, sent) = answer(&mut handle, 200, lease("other", "8")).await;
        if method == "PUT" {
            break sent;
        }
        assert_eq!(method, "GET");
    };
    assert!(unchanged.elapsed() >= Duration::from_secs(1), "took it after {:?}", unchanged.elapsed());
    assert_eq!(taken["spec"]["holderIdentity"], "me");
    assert_eq!(taken["spec"]["leaseTransitions"], 5);
    assert_eq!(taken["metadata"]["resourceVersion"], "8");
    // The PUT above got the Lease back as the answer: leading.
    leading.changed().await.unwrap();
    assert!(*leading.borrow());
    run.abort();
}

#[tokio::test]
async fn a_clean_shutdown_releases_the_lease() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let elector = Elector::new(Client::new(service, "default"), config());
    let release = tokio::spawn(async move { elector.release().await });
    assert_eq!(answer(&mut handle, 200, lease("me", "3")).await.0, "GET");
    let (method, path, sent) = answer(&mut handle, 200, lease("", "4")).await;
    assert_eq!((method.as_str(), path.as_str()), ("PUT", LEASE));
    assert!(sent["spec"]["holderIdentity"].is_null(), "{sent}");
    release.await.unwrap();
}
