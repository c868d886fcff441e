//! Operator cost at scale: N TaskQueues on one broker, the real operator binary watching them.
//! Prints time to converge, then over a quiet minute: API writes, broker reads, operator RSS
//! and CPU. Asserts nothing.
//!
//!   cargo build --release && cargo run --release --example bench_scale -- 1000 [SECONDS] [SETTLE]
//!
//! SETTLE: wait up to that many seconds for the controller-manager to finish rolling the new
//! Deployments out (no change for 30 s) before the quiet period.
//!
//! Needs the local stack (`source` the env file `deploy/local/up.sh` prints): it creates a
//! namespace `bench-N-...` in that API server and deletes it at the end.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use taskqueue_operator::crd::TaskQueue;

fn metric_sum(exposition: &str, prefix: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.trim().parse::<f64>().ok()))
        .sum()
}

fn metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// (RSS in MiB, CPU seconds) of a process, from /proc.
fn usage(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(") ").map(|(_, r)| r.split(' ').collect()).unwrap_or_default();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (rss_kib / 1024.0, ticks / 100.0)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let quiet: u64 = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(60);
    // Wait up to this long for the controller-manager to finish rolling the Deployments out
    // before the quiet period (0: measure right away).
    let settle: u64 = std::env::args().nth(3).and_then(|a| a.parse().ok()).unwrap_or(0);
    let redis_url = std::env::var("TQ_REDIS_URL").expect("TQ_REDIS_URL (source the local stack's env file)");
    let client = Client::try_default().await.expect("KUBECONFIG");
    let ns = format!("bench-{n}-{}", std::process::id());
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap())
        .await
        .unwrap();
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "celery-broker"}, "stringData": {"url": redis_url}}))
            .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &secret).await.unwrap();

    let api: Api<TaskQueue> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    let creates = futures::stream::iter(0..n).map(|i| {
        let api = api.clone();
        async move {
            let tq: TaskQueue = serde_json::from_value(json!({
                "apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue",
                "metadata": {"name": format!("q{i}")},
                "spec": {
                    "queue": format!("bench_q{i}"),
                    "broker": {"urlSecretRef": {"name": "celery-broker"}},
                    "worker": {"image": "example/app:1", "app": "app.worker", "concurrency": 2},
                    "scaling": {"minReplicas": 0, "maxReplicas": 5, "pollInterval": "2s"}
                }
            }))
            .unwrap();
            api.create(&PostParams::default(), &tq).await.unwrap();
        }
    });
    creates.buffer_unordered(16).collect::<Vec<_>>().await;
    println!("created {n} TaskQueues in {:.1}s", started.elapsed().as_secs_f64());

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // The release binary next to this example's own build (same target dir).
    let bin = std::env::var("TQ_OPERATOR_BIN").unwrap_or_else(|_| {
        let me = std::env::current_exe().unwrap();
        me.parent().unwrap().parent().unwrap().join("taskqueue-operator").display().to_string()
    });
    let mut operator = std::process::Command::new(&bin)
        .args(["run", "--leader-election=false", "--namespace", &ns, "--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e} (cargo build --release first)"));
    let pid = operator.id();
    let t0 = Instant::now();
    // Converged: every TaskQueue has a decision and status shows it (Deployments created).
    // The operator's metrics first; the (heavy) list of every TaskQueue only once they say so,
    // so the benchmark does not load the API server it measures.
    loop {
        let m = metrics(port);
        let decided = m.lines().filter(|l| l.starts_with("taskqueue_desired_replicas{")).count();
        let with_status = if decided == n {
            let all = api.list(&ListParams::default()).await.unwrap().items;
            all.iter().filter(|t| t.status.as_ref().is_some_and(|s| s.pending.is_some())).count()
        } else {
            0
        };
        if decided == n && with_status == n {
            break;
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            panic!("not converged after 30 min: {decided} decided, {with_status} with status");
        }
        tokio::time::sleep(Duration::from_millis(if decided == n { 2000 } else { 500 })).await;
    }
    let converged = t0.elapsed();
    let (rss_peak, cpu_startup) = usage(pid);
    println!("converged (all {n} Deployments created, status written) in {:.1}s; CPU {cpu_startup:.1}s, RSS {rss_peak:.1} MiB", converged.as_secs_f64());
    tokio::time::sleep(Duration::from_secs(10)).await; // let the last status writes land

    // The controller-manager rolls the new Deployments out at its own pace (client QPS 20 by
    // default: ~7 Deployments a second): each change of their status wakes the operator. Count
    // them, so the reconciles they cause are told apart from the operator's own.
    let deployment_changes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = tokio::spawn({
        use kube::runtime::{watcher, WatchStreamExt};
        let changes = deployment_changes.clone();
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let config = watcher::Config::default().any_semantic();
        async move {
            let mut first = true;
            let stream = watcher(deployments, config).default_backoff();
            futures::pin_mut!(stream);
            while let Some(Ok(e)) = stream.next().await {
                match e {
                    watcher::Event::InitDone => first = false,
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) if !first => {
                        changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await; // the watch's initial list
    if settle > 0 {
        let t = Instant::now();
        loop {
            let c0 = deployment_changes.load(std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(30)).await;
            let c = deployment_changes.load(std::sync::atomic::Ordering::Relaxed) - c0;
            let (rss, _) = usage(pid);
            eprintln!(
                "  settling {:.0}s: {} Deployment changes in 30s, RSS {rss:.1} MiB",
                t.elapsed().as_secs_f64(),
                c
            );
            if c == 0 || t.elapsed() > Duration::from_secs(settle) {
                println!(
                    "controller-manager: {c} Deployment changes in the last 30s, after {:.0}s of waiting",
                    t.elapsed().as_secs_f64()
                );
                break;
            }
        }
    }
    let before = metrics(port);
    let (_, cpu0) = usage(pid);
    let changes0 = deployment_changes.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(quiet)).await;
    let changes = deployment_changes.load(std::sync::atomic::Ordering::Relaxed) - changes0;
    counter.abort();
    // CPU is taken before the closing scrape: rendering /metrics for n TaskQueues is the
    // benchmark's doing, not the quiet operator's (it is printed on its own below).
    let (rss, cpu1) = usage(pid);
    let after = metrics(port);
    let (_, cpu2) = usage(pid);
    let per_min = 60.0 / quiet as f64;
    let delta = |p: &str| metric_sum(&after, p) - metric_sum(&before, p);
    let reads = delta("taskqueue_broker_reads_total");
    let read_s = delta("taskqueue_broker_read_seconds_sum");
    println!("quiet {quiet}s with {n} TaskQueues, nothing changing:");
    println!("  API writes/min      {:.0}", delta("taskqueue_api_writes_total") * per_min);
    for kind in ["deployment", "status", "event", "pod", "configmap"] {
        let d = delta(&format!("taskqueue_api_writes_total{{kind=\"{kind}\"}}"));
        if d > 0.0 {
            println!("    {kind:<12}      {:.0}", d * per_min);
        }
    }
    println!(
        "  reconciles/min      {:.0} (Deployment status changes by the controller-manager: {:.0}/min)",
        delta("taskqueue_reconciles_total") * per_min,
        changes as f64 * per_min
    );
    println!(
        "  broker reads/min    {:.0} (mean {:.2} ms per read of all {n} queues)",
        reads * per_min,
        read_s * 1000.0 / reads.max(1.0)
    );
    println!("  operator CPU        {:.1}% of one core", (cpu1 - cpu0) * 100.0 / quiet as f64);
    println!("  operator RSS        {rss:.1} MiB");
    println!("  one /metrics scrape {:.0} ms of CPU ({} KiB)", (cpu2 - cpu1) * 1000.0, after.len() / 1024);

    let _ = operator.kill();
    let _ = operator.wait();
    let _ = Api::<Namespace>::all(client).delete(&ns, &DeleteParams::default()).await;
}
