//! Demand that is real, end to end: real Celery workers holding countdown tasks, tasks coming
//! due, and two TaskQueues on one queue, on the real API server and redis-server. Marked
//! `#[ignore]`: `make test` starts the stack and runs them. The figures they measure go to
//! docs/demand.md.

mod support;

use std::time::{Duration, Instant};

use kube::api::{DeleteParams, Patch, PatchParams};
use kube::Api;
use serde_json::json;
use support::*;
use taskqueue_operator::crd::TaskQueue;

/// A pool of real workers with `-c 2 --prefetch-multiplier 1` on `queue`.
fn pool2(name: &str, queue: &str, scaling: serde_json::Value) -> serde_json::Value {
    let mut tq = pool(name, queue, scaling);
    tq["spec"]["worker"]["concurrency"] = json!(2);
    tq["spec"]["worker"]["prefetchMultiplier"] = json!(1);
    tq
}

fn status(tq: &TaskQueue) -> (Option<i64>, Option<i64>, Option<i64>, Option<i32>) {
    let s = tq.status.clone().unwrap_or_default();
    (s.pending, s.in_flight, s.scheduled, s.desired_replicas)
}

/// Celery's own view of its workers: tasks active, reserved (prefetched) and scheduled (ETA).
fn inspect(url: &str) -> serde_json::Value {
    serde_json::from_str(celery(url, &["inspect"]).trim()).unwrap()
}

/// A namespace with the broker Secret pointing at a fresh redis-server.
async fn stack(prefix: &str) -> (kube::Client, String, Redis) {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, prefix).await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    (client, ns, redis)
}

/// A real worker running the command of TaskQueue `name`'s Deployment, once it answers.
async fn worker_of(client: &kube::Client, ns: &str, name: &str, url: &str) -> Worker {
    let d = deployment(client, ns, name).await.unwrap();
    let worker = Worker::start(url, &command(&d));
    wait_for("the worker answers", T, || async { (inspect(url)["workers"] == 1).then_some(()) }).await;
    worker
}

/// `taskqueue-operator depth` for one queue: the line it printed, parsed and as printed.
fn depth(url: &str, queue: &str) -> (serde_json::Value, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_taskqueue-operator"))
        .args(["depth", "--broker-url", url, "--queue", queue])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap().trim().to_string();
    (serde_json::from_str(&line).unwrap(), line)
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn depth_matches_a_count_by_hand_of_pending_prefetched_running_and_scheduled_tasks() {
    let redis = Redis::start().await;
    let url = redis.url();
    // One real worker, -c 2, prefetch 1, slow tasks (about 30 s each).
    let command: Vec<String> =
        "celery -A app.worker worker --queues=mixed --concurrency=2 --prefetch-multiplier=1 -n mixed@%h"
            .split(' ')
            .map(String::from)
            .collect();
    let _worker = Worker::start_scaled(&url, &command, "3");
    wait_for("the worker answers", T, || async { (inspect(&url)["workers"] == 1).then_some(()) }).await;
    celery(&url, &["later", "mixed", "20", "3600"]);
    celery(&url, &["slow", "mixed", "9"]);
    // 2 running, 2 prefetched, 5 waiting, 20 held for an hour.
    let hand = wait_for("the worker to settle", T, || async {
        let i = inspect(&url);
        (i["active"] == 2 && i["reserved"] == 2 && i["scheduled"] == 20).then_some(i)
    })
    .await;
    let (d, printed) = depth(&url, "mixed");
    let mut conn = support::redis_conn(url.as_str()).await;
    let llen: i64 = redis::cmd("LLEN").arg("mixed").query_async(&mut conn).await.unwrap();
    let hlen: i64 = redis::cmd("HLEN").arg("unacked").query_async(&mut conn).await.unwrap();
    assert_eq!(d["pending"], llen, "{d}");
    assert_eq!(d["pending"], 5, "9 slow tasks - 2 running - 2 prefetched");
    assert_eq!(d["inFlight"], hand["reserved"], "prefetched: {d} vs {hand}");
    assert_eq!(d["scheduled"], hand["scheduled"], "held for their ETA: {d} vs {hand}");
    assert_eq!(d["inFlight"].as_i64().unwrap() + d["scheduled"].as_i64().unwrap(), hlen, "every unacked entry");
    let table = format!(
        "| what | by hand | `taskqueue-operator depth --queue mixed` |\n|---|---|---|\n\
         | waiting in the list | `LLEN mixed` = {llen} | `pending` {} |\n\
         | prefetched (reserved, not started) | `inspect reserved` = {} | `inFlight` {} |\n\
         | running (acked when started: not in Redis) | `inspect active` = {} | not counted |\n\
         | held for an ETA one hour away | `inspect scheduled` = {} | `scheduled` {} |\n\
         | all unacked | `HLEN unacked` = {hlen} | `inFlight + scheduled` = {} |\n\n\
         `depth` printed: `{printed}`\n",
        d["pending"],
        hand["reserved"],
        d["inFlight"],
        hand["active"],
        hand["scheduled"],
        d["scheduled"],
        d["inFlight"].as_i64().unwrap() + d["scheduled"].as_i64().unwrap(),
    );
    support::docs::checked("docs/demand.md", "depth", &table, str::to_string);
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn countdown_tasks_held_by_a_worker_keep_the_pool_at_one() {
    let (client, ns, redis) = stack("eta").await;
    let scaling = json!({"minReplicas": 1, "maxReplicas": 10, "pollInterval": "500ms", "scaleDown": {"stabilizationWindow": "2s"}});
    create_taskqueue(&client, &ns, pool2("later", "later_q", scaling)).await;
    let operator = Operator::start(&client, &ns);
    wait_replicas(&client, &ns, "later", 1).await;
    let _worker = worker_of(&client, &ns, "later", &redis.url()).await;

    // 20 tasks with countdown=3600: the worker takes them all and holds them for an hour.
    celery(&redis.url(), &["later", "later_q", "20", "3600"]);
    wait_for("20 scheduled, nothing pending or in flight", T, || async {
        let tq = taskqueue(&client, &ns, "later").await;
        (status(&tq) == (Some(0), Some(0), Some(20), Some(1))).then_some(())
    })
    .await;
    // Many polls and more than the window later: still one replica, not ceil(20 / 2) = 10.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(replicas(&deployment(&client, &ns, "later").await.unwrap()), 1);
    }
    let tq = taskqueue(&client, &ns, "later").await;
    let (_, _, why) = condition(&tq, "ScalingLimited").unwrap();
    assert!(why.contains("20 scheduled beyond etaHorizon, not counted"), "{why}");

    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn tasks_coming_due_grow_the_pool_before_their_eta() {
    let (client, ns, redis) = stack("due").await;
    let scaling = json!({"minReplicas": 1, "maxReplicas": 10, "pollInterval": "500ms", "etaHorizon": "10s",
                         "scaleDown": {"stabilizationWindow": "2s"}});
    create_taskqueue(&client, &ns, pool2("soon", "soon_q", scaling)).await;
    let operator = Operator::start(&client, &ns);
    wait_replicas(&client, &ns, "soon", 1).await;
    let _worker = worker_of(&client, &ns, "soon", &redis.url()).await;

    // 8 tasks due in 25 s: scheduled for 15 s, then within the 10 s horizon.
    let countdown = 25;
    let sent = Instant::now();
    celery(&redis.url(), &["later", "soon_q", "8", &countdown.to_string()]);
    let due = sent + Duration::from_secs(countdown);
    // The decision that saw them scheduled kept one replica (the same status says both).
    let scheduled = wait_for("8 scheduled", T, || async {
        Some(taskqueue(&client, &ns, "soon").await).filter(|t| status(t).2 == Some(8))
    })
    .await;
    assert_eq!(scheduled.status.unwrap().desired_replicas, Some(1), "scheduled tasks add nothing");
    // Sampled while they are scheduled (up to 2 s before they enter the horizon), for the doc.
    let mut samples = 0;
    while Instant::now() + Duration::from_secs(12) < due {
        assert_eq!(replicas(&deployment(&client, &ns, "soon").await.unwrap()), 1, "scheduled tasks add nothing");
        samples += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Then ceil(8 / 2) = 4 before they are due: decided while all 8 were still held (a task
    // that had started would have been acked; the reason gives the count the decision used).
    wait_replicas(&client, &ns, "soon", 4).await;
    let grown = Instant::now();
    let up = wait_for("the scale-up's reason", T, || async {
        let reason = taskqueue(&client, &ns, "soon").await.status?.last_scale_reason?;
        reason.contains("-> 4").then_some(reason)
    })
    .await;
    assert!(up.contains("8 in flight"), "decided with all 8 held, before any was due: {up}");
    // The status is written right after the Deployment: wait for it rather than race it.
    wait_for("due within the horizon: 8 in flight in the status", T, || async {
        (status(&taskqueue(&client, &ns, "soon").await).1 == Some(8)).then_some(())
    })
    .await;
    let ahead = due.saturating_duration_since(grown);
    support::docs::measured(
        "docs/demand.md",
        "eta",
        &format!(
            "8 countdown tasks (25 s) held by one real worker (`-c 2 --prefetch-multiplier 1`), `etaHorizon: 10s`, \
             `pollInterval: 500ms`: {samples} samples at 1 replica while they were scheduled; grown to 4 replicas \
             {:.1} s after sending, {:.1} s before they were due.\n",
            (grown - sent).as_secs_f64(),
            ahead.as_secs_f64()
        ),
    );

    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn two_taskqueues_on_one_queue_count_its_demand_once() {
    let (client, ns, redis) = stack("shared").await;
    let scaling = json!({"minReplicas": 0, "maxReplicas": 10, "pollInterval": "500ms", "scaleDown": {"stabilizationWindow": "1s"}});
    create_taskqueue(&client, &ns, pool2("alpha", "shared_q", scaling.clone())).await;
    create_taskqueue(&client, &ns, pool2("beta", "shared_q", scaling.clone())).await;
    let operator = Operator::start(&client, &ns);

    // 8 pending, concurrency 2, both pools on the queue as spec.queue with equal capacity:
    // 4 messages each, 2 replicas each (4 in all, as one pool would run; not 4 + 4).
    celery(&redis.url(), &["sendq", "shared_q", "8"]);
    wait_replicas(&client, &ns, "alpha", 2).await;
    wait_replicas(&client, &ns, "beta", 2).await;
    let mut rows = vec![("both have it as spec.queue".to_string(), 2, 2)];
    for (me, other) in [("alpha", "beta"), ("beta", "alpha")] {
        let (tq, msg) = wait_condition(&client, &ns, me, "QueueShared", "True").await;
        assert_eq!(
            msg,
            format!(
                "queue shared_q is also consumed by {other} (spec.queue): this pool counts 20/40 of its demand \
                 (split by maxReplicas × tasksPerReplica)"
            )
        );
        assert_eq!(status(&tq).0, Some(4), "{me} counts its half");
        assert_eq!(tq.status.as_ref().unwrap().pending_by_queue["shared_q"], 8);
        let why = tq.status.as_ref().unwrap().last_scale_reason.clone().unwrap();
        assert!(why.contains("counts 4 of 8 pending") && why.contains("(share 20/40)"), "{why}");
    }

    // beta now takes the queue only as an extra: alpha owns its demand, beta counts none of it.
    let api: Api<TaskQueue> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"spec": {"queue": "beta_q", "extraQueues": ["shared_q"]}});
    api.patch("beta", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_replicas(&client, &ns, "alpha", 4).await;
    wait_replicas(&client, &ns, "beta", 0).await;
    rows.push(("beta lists it in extraQueues".into(), 4, 0));
    let (_, msg) = wait_condition(&client, &ns, "beta", "QueueShared", "True").await;
    assert!(msg.contains("counted by alpha (its spec.queue), not here"), "{msg}");

    // alpha goes: beta is the queue's only consumer and counts all of it.
    api.delete("alpha", &DeleteParams::default()).await.unwrap();
    wait_replicas(&client, &ns, "beta", 4).await;
    rows.push(("alpha deleted".into(), -1, 4));
    let (_, msg) = wait_condition(&client, &ns, "beta", "QueueShared", "False").await;
    assert_eq!(msg, "no other TaskQueue here consumes this pool's queues");
    // One QueueShared event per change of who shares, not one per poll.
    assert_eq!(events(&client, &ns, "beta", "QueueShared").await.len(), 2, "spec.queue split, then extraQueues");

    let mut table = String::from(
        "8 messages pending on `shared_q`, no workers, concurrency 2, `maxReplicas: 10` for both:\n\n\
         | layout | alpha replicas | beta replicas |\n|---|---|---|\n",
    );
    for (layout, a, b) in rows {
        let a = if a < 0 { "deleted".to_string() } else { a.to_string() };
        table.push_str(&format!("| {layout} | {a} | {b} |\n"));
    }
    support::docs::checked("docs/demand.md", "shared-queue", &table, str::to_string);

    operator.stop().await;
    delete_namespace(&client, &ns).await;
}
