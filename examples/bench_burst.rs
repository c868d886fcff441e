//! Burst latency: messages pushed to a queue -> the worker Deployment's `spec.replicas` written,
//! push vs poll side by side in one run, next to the physical limit measured in the same run
//! (a keyspace notification plus a bare `/scale` PATCH). Prints figures, asserts nothing.
//!
//!   cargo run --release --example bench_burst -- [BURSTS] [SVG_PATH]
//!
//! Needs the local stack (`source` the env file `deploy/local/up.sh` prints) and redis-server
//! (`TQ_REDIS_SERVER` or on PATH): it starts two private brokers (one with
//! `notify-keyspace-events El`, one without), runs the controller in this process, creates a
//! namespace `burst-...` and deletes it at the end.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use serde_json::json;
use taskqueue_operator::controller::{self, Settings};
use taskqueue_operator::crd::TaskQueue;

struct Broker(Child, u16);

impl Broker {
    fn start(notify: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let bin = std::env::var("TQ_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--notify-keyspace-events", notify])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (TQ_REDIS_SERVER)");
        std::thread::sleep(Duration::from_millis(300));
        Broker(child, port)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.1)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// p50, p95 and max in milliseconds.
fn summary(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| ms(v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]);
    (at(0.5), at(0.95), ms(*v.last().unwrap()))
}

/// The distributions as an SVG strip plot on a log scale (0.05 ms .. 5 s): one row per path,
/// a dot per sample, ticks at p50 and p95. Hand-drawn: no plotting dependency.
fn svg(rows: &[(String, Vec<Duration>)]) -> String {
    let (left, width, row_h, top) = (230.0, 620.0, 34.0, 40.0);
    let (lo, hi) = (0.05f64.log10(), 5000f64.log10());
    let x = |ms: f64| left + (ms.max(0.05).log10() - lo) / (hi - lo) * width;
    let height = top + row_h * rows.len() as f64 + 40.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">Burst (LPUSH) to spec.replicas written, ms (log scale); dots: samples, bars: p50 and p95</text>\n",
        w = left + width + 30.0
    );
    for ms in [0.1, 1.0, 10.0, 100.0, 1000.0] {
        let gx = x(ms);
        out.push_str(&format!(
            "<line x1=\"{gx:.1}\" y1=\"{top}\" x2=\"{gx:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\n\
             <text x=\"{gx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{ms}</text>\n",
            height - 35.0,
            height - 20.0
        ));
    }
    for (i, (label, samples)) in rows.iter().enumerate() {
        let y = top + row_h * (i as f64 + 0.5);
        let colour = if label.starts_with("push") {
            "#1a7f37"
        } else if label.starts_with("poll") {
            "#cf222e"
        } else {
            "#57606a"
        };
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>\n",
            left - 8.0,
            y + 4.0
        ));
        for d in samples {
            out.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{colour}\" fill-opacity=\"0.5\"/>\n",
                x(d.as_secs_f64() * 1000.0)
            ));
        }
        let (p50, p95, _) = summary(samples.clone());
        for (q, h) in [(p50, 12.0), (p95, 8.0)] {
            out.push_str(&format!(
                "<line x1=\"{q:.1}\" y1=\"{:.1}\" x2=\"{q:.1}\" y2=\"{:.1}\" stroke=\"black\" stroke-width=\"2\"/>\n",
                y - h,
                y + h,
                q = x(q)
            ));
        }
    }
    out.push_str("</svg>\n");
    out
}

fn taskqueue(name: &str, queue: &str, secret: &str, poll: &str) -> TaskQueue {
    serde_json::from_value(json!({
        "apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue",
        "metadata": {"name": name},
        "spec": {
            "queue": queue,
            "broker": {"urlSecretRef": {"name": secret}},
            "worker": {"image": "example/app:1", "app": "app.worker", "concurrency": 4},
            "scaling": {"minReplicas": 0, "maxReplicas": 10, "pollInterval": poll, "scaleDown": {"stabilizationWindow": "0s"}}
        }
    }))
    .unwrap()
}

#[tokio::main]
async fn main() {
    let bursts: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let client = Client::try_default().await.expect("KUBECONFIG (source the local stack's env file)");
    // One broker per pool: a reader polls its broker at the shortest interval of its pools.
    let (pushing, silent1, silent2) = (Broker::start("El"), Broker::start(""), Broker::start(""));
    let ns = format!("burst-{}", std::process::id());
    let namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &namespace).await.unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    for (name, url) in [("pushing", pushing.url()), ("silent1", silent1.url()), ("silent2", silent2.url())] {
        let s = serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"url": url}})).unwrap();
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
    // (TaskQueue, queue, broker Secret, pollInterval, label)
    let pools = [
        ("push", "push_q", "pushing", "2s", "push (pollInterval 2s)"),
        ("poll1", "poll1_q", "silent1", "1s", "poll, pollInterval 1s"),
        ("poll2", "poll2_q", "silent2", "2s", "poll, pollInterval 2s"),
    ];
    let tqs = Api::<TaskQueue>::namespaced(client.clone(), &ns);
    for (name, queue, secret, poll, _) in &pools {
        tqs.create(&PostParams::default(), &taskqueue(name, queue, secret, poll)).await.unwrap();
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let settings = Settings { namespaces: vec![ns.clone()], ..Settings::default() };
    let operator = tokio::spawn(controller::run(client.clone(), settings, async move {
        let _ = stop_rx.await;
    }));

    // Every change of a Deployment's spec.replicas, as the API server's watch delivers it.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(String, i32, Instant)>();
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    tokio::spawn(watcher(deployments.clone(), watcher::Config::default()).applied_objects().for_each(move |d| {
        if let Ok(d) = d {
            let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
            let _ = seen_tx.send((d.metadata.name.unwrap_or_default(), replicas, Instant::now()));
        }
        async {}
    }));
    let mut replicas: HashMap<String, i32> = HashMap::new();
    let mut wait_for = async |want: &[(&str, i32)]| -> HashMap<String, Instant> {
        let mut at = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for (name, r) in want {
                if replicas.get(*name) == Some(r) {
                    at.entry(name.to_string()).or_insert_with(Instant::now);
                }
            }
            if at.len() == want.len() {
                return at;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, seen.recv()).await {
                Ok(Some((name, r, t))) => {
                    replicas.insert(name.clone(), r);
                    if want.iter().any(|(n, w)| *n == name && *w == r) {
                        at.entry(name).or_insert(t);
                    }
                }
                _ => panic!("no {want:?} within 60 s; replicas now {replicas:?}"),
            }
        }
    };
    let all = |r: i32| pools.iter().map(|p| (p.0, r)).collect::<Vec<_>>();
    wait_for(&all(0)).await;

    let conn = |url: &str| {
        let url = url.to_string();
        async move { redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap() }
    };
    let mut conns = HashMap::new();
    for (secret, url) in [("pushing", pushing.url()), ("silent1", silent1.url()), ("silent2", silent2.url())] {
        conns.insert(secret, conn(&url).await);
    }
    let mut latencies: HashMap<&str, Vec<Duration>> = HashMap::new();
    for _ in 0..bursts {
        // 8 messages per queue, 4 per replica: each pool goes 0 -> 2.
        let items: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
        let mut sent = HashMap::new();
        for (name, queue, secret, ..) in &pools {
            let c = conns.get_mut(secret).unwrap();
            sent.insert(*name, Instant::now());
            let _: () = redis::cmd("LPUSH").arg(queue).arg(&items).query_async(c).await.unwrap();
        }
        let at = wait_for(&all(2)).await;
        for (name, ..) in &pools {
            latencies.entry(name).or_default().push(at[*name] - sent[name]);
        }
        for (_, queue, secret, ..) in &pools {
            let c = conns.get_mut(secret).unwrap();
            let _: () = redis::cmd("DEL").arg(queue).query_async(c).await.unwrap();
        }
        wait_for(&all(0)).await;
        // Start the next burst at a random point of the poll cycle.
        tokio::time::sleep(Duration::from_millis(137 + 311 * (latencies["push"].len() as u64 % 7))).await;
    }

    // The physical limit, in the same run: a keyspace notification, and a bare /scale PATCH.
    let mut notify = Vec::new();
    let mut sub = redis::Client::open(pushing.url()).unwrap().get_async_pubsub().await.unwrap();
    sub.subscribe("__keyevent@0__:lpush").await.unwrap();
    let mut messages = sub.on_message();
    for _ in 0..bursts {
        let t0 = Instant::now();
        let c = conns.get_mut("pushing").unwrap();
        let _: () = redis::cmd("LPUSH").arg("limit_q").arg("x").query_async(c).await.unwrap();
        messages.next().await.unwrap();
        notify.push(t0.elapsed());
    }
    drop(messages);
    let bare: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "bare"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "bare"}},
                 "template": {"metadata": {"labels": {"app": "bare"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}
    }))
    .unwrap();
    deployments.create(&PostParams::default(), &bare).await.unwrap();
    let mut patch = Vec::new();
    for i in 0..bursts {
        let t0 = Instant::now();
        let body = json!({"spec": {"replicas": (i % 2 + 1) as i32}});
        deployments.patch_scale("bare", &PatchParams::default(), &Patch::Merge(&body)).await.unwrap();
        patch.push(t0.elapsed());
    }

    println!("{bursts} bursts of 8 messages (0 -> 2 replicas), LPUSH to spec.replicas seen on a watch:\n");
    println!("| path | p50 ms | p95 ms | max ms |\n|---|---|---|---|");
    let mut rows: Vec<(String, Vec<Duration>)> = Vec::new();
    for (name, .., label) in &pools {
        let (p50, p95, max) = summary(latencies[name].clone());
        println!("| {label} | {p50:.1} | {p95:.1} | {max:.1} |");
        rows.push((label.to_string(), latencies[name].clone()));
    }
    let limit: Vec<Duration> = notify.iter().zip(&patch).map(|(a, b)| *a + *b).collect();
    for (label, v) in [
        ("limit: keyspace notification", notify),
        ("limit: bare /scale PATCH", patch),
        ("limit: notification + PATCH", limit),
    ] {
        let (p50, p95, max) = summary(v.clone());
        println!("| {label} | {p50:.2} | {p95:.2} | {max:.2} |");
        rows.push((label.to_string(), v));
    }
    if let Some(path) = std::env::args().nth(2) {
        std::fs::write(&path, svg(&rows)).unwrap();
        println!("\nwrote {path}");
    }

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
    let _ = Api::<Namespace>::all(client).delete(&ns, &DeleteParams::default()).await;
}
