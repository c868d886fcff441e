//! Push reaction on the real stack: a broker that sends list-push notifications is read as soon
//! as one of its queues is pushed to, whatever the poll interval; one that does not is polled.
//! Marked `#[ignore]`: `make test` runs it.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use taskqueue_operator::metrics::Metrics;

async fn notify(url: &str, flags: &str) {
    let mut c = support::redis_conn(url).await;
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg(flags).query_async(&mut c).await.unwrap();
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn a_notifying_broker_is_read_on_push_and_a_silent_one_at_its_poll() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "push").await;
    let pushing = Redis::start().await;
    notify(&pushing.url(), "El").await;
    let silent = Redis::start().await;
    // Two namespaces' worth of brokers in one: the Secret per TaskQueue differs.
    broker_secret(&client, &ns, &pushing.url()).await;
    let hour = json!({"pollInterval": "1h", "scaleDown": {"stabilizationWindow": "1s"}});
    create_taskqueue(&client, &ns, pool("fast", "fast_q", hour.clone())).await;
    let mut quiet = pool("slow", "slow_q", hour);
    quiet["spec"]["broker"]["urlSecretRef"]["name"] = json!("silent-broker");
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "silent-broker"},
        "stringData": {"url": silent.url()}
    }))
    .unwrap();
    kube::Api::namespaced(client.clone(), &ns).create(&Default::default(), &secret).await.unwrap();
    create_taskqueue(&client, &ns, quiet).await;
    let metrics = Arc::new(Metrics::new());
    let operator = Operator::start_with(&client, &ns, |s| s.metrics = metrics.clone());

    wait_for("the push mode in the condition", T, || async {
        let (_, msg) = wait_condition(&client, &ns, "fast", "BrokerReachable", "True").await;
        msg.contains("reacting by push").then_some(())
    })
    .await;
    let (_, slow_msg) = wait_condition(&client, &ns, "slow", "BrokerReachable", "True").await;
    assert!(slow_msg.contains("polling every 1h: the broker sends no list-push notifications"), "{slow_msg}");

    // 8 messages on each: with a one-hour poll, only the push can make a pool grow.
    let pushed = Instant::now();
    lpush(&pushing.url(), "fast_q", 8).await;
    lpush(&silent.url(), "slow_q", 8).await;
    wait_replicas(&client, &ns, "fast", 2).await;
    let took = pushed.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(replicas(&deployment(&client, &ns, "slow").await.unwrap()), 0, "the silent broker waits for its poll");
    println!("push to spec.replicas (seen by a 200 ms API poll): {took:?}");
    let text = metrics.render();
    let mode = |name: &str| metric(&text, &format!("taskqueue_broker_push{{namespace=\"{ns}\",name=\"{name}\"}}"));
    assert_eq!((mode("fast"), mode("slow")), (1.0, 0.0), "{text}");
    assert!(!text.contains("redis://") && !text.contains("127.0.0.1"), "no broker address in a label: {text}");

    operator.stop().await;
    delete_namespace(&client, &ns).await;
}
