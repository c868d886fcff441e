//! The number users feel: from a burst's first message to the first task *started on a new
//! worker pod*, split into the operator's reaction (first message -> the Deployment's replicas
//! written), the pod's start (replicas written -> pod Ready) and Celery's start (pod Ready -> the
//! first task starts). Real pods on the lab's node; prints p50/p95/max, asserts nothing.
//!
//!   source "$(bash deploy/local/up.sh | tail -1 | sed 's/^source //')"
//!   lab cargo run --release --example bench_pod_start -- [ROUNDS] [BURST]
//!
//! Each round: the pool is at 0 replicas with no pod left; BURST (8) tasks of 0.1 s go to its queue;
//! `tasksPerReplica` 4, so the operator asks for BURST/4 pods. The controller runs in this process
//! (like `make demo`'s operator, outside the cluster) against a private redis-server that the pods
//! reach on the lab's bridge, with keyspace notifications on (push mode). The first message is
//! timed by the same notification the operator reacts to; a task's start by the task itself
//! (`TASK_RECORD_KEY:starts`); replicas written and pod Ready by watches; all on this machine's clock.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::runtime::watcher;
use kube::Api;
use serde_json::json;
use support::*;

const QUEUE: &str = "podstartq";

/// One round's instants (seconds since the epoch).
struct Round {
    first_message: f64,
    replicas_written: f64,
    pod_ready: f64,
    first_task: f64,
}

/// p50, p95 and max.
fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.5), at(0.95), *v.last().unwrap())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).map_or(10, |a| a.parse().expect("ROUNDS"));
    let burst: usize = args.get(2).map_or(8, |a| a.parse().expect("BURST"));
    let lab = Lab::from_env().unwrap_or_else(|why| panic!("{why} (source the env file up.sh prints, run with `lab`)"));
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "podstart").await;
    let redis = Redis::start_for_pods(&lab).await;
    let mut c = redis_conn(&redis.url()).await;
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg("El").query_async(&mut c).await.unwrap();
    broker_secret(&client, &ns, &redis.url_for_pods()).await;
    let operator = Operator::start(&client, &ns);

    let mut tq = pool(
        "podstart",
        QUEUE,
        json!({"minReplicas": 0, "maxReplicas": 4, "tasksPerReplica": 4, "pollInterval": "1s",
               "scaleDown": {"stabilizationWindow": "2s"}}),
    );
    tq["spec"]["worker"] = json!({
        "image": WORKER_IMAGE, "app": "app.worker", "concurrency": 2, "prefetchMultiplier": 1,
        "terminationGracePeriodSeconds": 5,
        "env": [{"name": "TASK_RECORD_KEY", "value": "done"}, {"name": "TASK_SCALE", "value": "0.1"}],
        "podTemplate": {"spec": {"tolerations": [Lab::toleration()]}}
    });
    create_taskqueue(&client, &ns, tq).await;
    wait_for("the Deployment at 0", Duration::from_secs(60), || async {
        deployment(&client, &ns, "podstart").await.filter(|d| replicas(d) == 0)
    })
    .await;

    let mut all = Vec::new();
    for r in 0..rounds {
        let round = one_round(&client, &ns, &redis, r, burst).await;
        println!(
            "round {r:>2}: reaction {:>6.1} ms, pod start {:>5.2} s, Ready -> first task {:>5.2} s, total {:>5.2} s",
            (round.replicas_written - round.first_message) * 1000.0,
            round.pod_ready - round.replicas_written,
            round.first_task - round.pod_ready,
            round.first_task - round.first_message
        );
        all.push(round);
    }
    // taskqueue_broker_push{broker=...} is 1 while the broker's notifications drive the reads.
    let metrics = operator.metrics_text();
    let push = metrics.lines().any(|l| l.starts_with("taskqueue_broker_push{") && l.ends_with(" 1"));
    let mode = if push { "push (keyspace notifications)" } else { "poll (every 1 s)" };
    println!("\n{rounds} rounds, {burst} tasks each ({} pods asked for), broker read mode: {mode}", burst.div_ceil(4));
    println!("| step | p50 | p95 | max |\n|---|---|---|---|");
    let row = |name: &str, unit: &str, scale: f64, f: &dyn Fn(&Round) -> f64| {
        let (p50, p95, max) = summary(all.iter().map(f).collect());
        println!("| {name} | {:.1} {unit} | {:.1} {unit} | {:.1} {unit} |", p50 * scale, p95 * scale, max * scale);
    };
    row("first message -> replicas written (operator)", "ms", 1000.0, &|r| r.replicas_written - r.first_message);
    row("replicas written -> first new pod Ready (scheduler, kubelet, containerd)", "s", 1.0, &|r| {
        r.pod_ready - r.replicas_written
    });
    row("pod Ready -> first task started (Celery's start-up)", "s", 1.0, &|r| r.first_task - r.pod_ready);
    row("first message -> first task started on a new pod", "s", 1.0, &|r| r.first_task - r.first_message);
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

/// A burst into an idle pool, timed until a new pod runs its first task; then the pool back at
/// 0 with its pods gone, so the next round starts from nothing again.
async fn one_round(client: &kube::Client, ns: &str, redis: &Redis, r: usize, burst: usize) -> Round {
    // The first message, by the keyspace notification of its LPUSH (what push mode reacts to).
    let rc = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = rc.get_async_pubsub().await.unwrap();
    // `El`: key-event notifications of list commands; kombu LPUSHes a message, the payload is the key.
    pubsub.subscribe("__keyevent@0__:lpush").await.unwrap();
    let first = tokio::spawn(async move {
        let mut events = pubsub.on_message();
        while let Some(m) = events.next().await {
            if m.get_payload::<String>().is_ok_and(|key| key == QUEUE) {
                return Ok(unix_now());
            }
        }
        Err("the notifications ended")
    });
    // The Deployment's replicas and the pods, by watches.
    let written = watch_until(Api::<Deployment>::namespaced(client.clone(), ns), replicas_up).await;
    let ready = watch_until(Api::<Pod>::namespaced(client.clone(), ns), pod_ready).await;
    let prefix = format!("r{r}-");
    let url = redis.url();
    let n = burst.to_string();
    tokio::task::spawn_blocking(move || celery(&url, &["ids", QUEUE, &n, &prefix])).await.unwrap();
    let first_message = within("the burst's keyspace notification", first).await.expect("a notification");
    let replicas_written = within("the Deployment's replicas written", written).await;
    let pod_ready = within("a new pod Ready", ready).await;
    let prefix = format!("r{r}-");
    let first_task = wait_for("the first task of the round to start", Duration::from_secs(180), || async {
        starts(&redis.url(), &prefix).await.iter().map(|s| s.t).min_by(f64::total_cmp)
    })
    .await;
    // Back to 0, every pod gone.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait_for("the pool back at 0 with no pod", Duration::from_secs(180), || async {
        let at0 = deployment(client, ns, "podstart").await.is_some_and(|d| replicas(&d) == 0);
        let none = pods.list(&ListParams::default()).await.ok()?.items.is_empty();
        (at0 && none).then_some(())
    })
    .await;
    Round { first_message, replicas_written, pod_ready, first_task }
}

/// The instant the first object from `api` passes `done`, by a watch (no polling delay). Returns
/// once the watch has delivered its first list, so nothing that follows is missed.
async fn watch_until<K>(api: Api<K>, done: fn(&K) -> bool) -> tokio::task::JoinHandle<f64>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let (listed, is_listed) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut listed = Some(listed);
        let mut events = watcher(api, watcher::Config::default()).boxed();
        while let Some(e) = events.next().await {
            match e {
                Ok(watcher::Event::InitDone) => {
                    listed.take().map(|l| l.send(()));
                }
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) if done(&o) => return unix_now(),
                _ => {}
            }
        }
        panic!("the watch ended");
    });
    within("the watch's first list", is_listed).await;
    task
}

/// `f`'s result, or a panic naming `what` after 3 minutes (a round never hangs).
async fn within<T, E: std::fmt::Debug>(what: &str, f: impl std::future::Future<Output = Result<T, E>>) -> T {
    match tokio::time::timeout(Duration::from_secs(180), f).await {
        Ok(v) => v.unwrap_or_else(|e| panic!("{what}: {e:?}")),
        Err(_) => panic!("timed out after 180 s waiting for {what}"),
    }
}

fn replicas_up(d: &Deployment) -> bool {
    replicas(d) > 0
}
