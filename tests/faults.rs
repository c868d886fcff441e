//! The fault suite: real processes, loopback only, each fault bounded in time. A private control
//! plane (etcd + kube-apiserver + kube-controller-manager from `deploy/local/k8s.sh`, so its
//! parts can be killed without disturbing the other tests), a redis-server with an append-only
//! file (so it can come back with its data), the real operator binary, a real Celery worker and
//! producer. Every scenario: 40 tasks of one second each are sent, the pool scales up in steps
//! (`scaleUp.maxStep: 2`), and the fault strikes mid-scale; each fault is first shown to have
//! happened (its process gone and its port refusing, the proxy's delay or silence measured). Recorded: the Deployment's replicas
//! over time (every 100 ms), how long after the fault a probe TaskQueue reacts (0 -> 1), and
//! every task sent: run by the worker, or still in Redis (lists or `unacked`), or lost.
//!
//! The table is printed and written to docs/reliability.md (`faults` markers).
//!
//!   cargo test --test faults -- --ignored --nocapture     (part of `make test`; about 5 minutes)

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::{json, Value};
use support::*;

const TASKS: usize = 40;
const QUEUE: &str = "faults";

/// A control plane of our own: `k8s.sh up` with a private state dir and free ports.
struct Cluster {
    state: PathBuf,
}

impl Cluster {
    fn up() -> Self {
        let state = std::env::temp_dir().join(format!("tq-faults-{}", std::process::id()));
        let c = Cluster { state };
        c.k8s(&["up"]);
        c
    }

    fn k8s(&self, args: &[&str]) {
        let status = Command::new("bash")
            .arg(repo().join("deploy/local/k8s.sh"))
            .args(args)
            .env("TQ_STATE", &self.state)
            .stdout(Stdio::null())
            .status()
            .expect("run k8s.sh");
        assert!(status.success(), "k8s.sh {args:?} failed");
    }

    fn kubeconfig(&self) -> PathBuf {
        self.state.join("kubeconfig")
    }

    async fn client(&self) -> Client {
        let kc = Kubeconfig::read_from(self.kubeconfig()).unwrap();
        Client::try_from(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap()).unwrap()
    }

    /// SIGKILL one component (by the PID file `k8s.sh` keeps), and see it gone: no process, its
    /// port refusing connections.
    fn kill(&self, name: &str) {
        let pid = std::fs::read_to_string(self.state.join(format!("{name}.pid"))).unwrap();
        let pid: u32 = pid.trim().parse().unwrap();
        sigkill(pid);
        gone(pid, self.port(name.trim_start_matches("kube-")), name);
    }

    /// A component's port, from the `k8s.ports` line `k8s.sh up` writes.
    fn port(&self, name: &str) -> u16 {
        let ports = std::fs::read_to_string(self.state.join("k8s.ports")).unwrap();
        let (names, numbers) = ports.trim().split_once(':').unwrap();
        let i = names.split_whitespace().position(|n| n == name).unwrap_or_else(|| panic!("{name} in {ports}"));
        numbers.split_whitespace().nth(i).unwrap().parse().unwrap()
    }

    fn start(&self, name: &str) {
        self.k8s(&["start", name]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.k8s(&["down"]);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// `kill -SIGNAL pid` with bash's builtin (no procps needed); the signal must be delivered.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("bash").args(["-c", &format!("kill -{signal} {pid}")]).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}: no such process");
}

/// Wait (10 s at most) until process `pid` is gone and nothing accepts on `port`: a fault that
/// did not happen fails here, not as a green row.
fn gone(pid: u32, port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "));
        let refused = std::net::TcpStream::connect(("127.0.0.1", port))
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
        if !alive && refused {
            return;
        }
        assert!(Instant::now() < deadline, "{what} (pid {pid}, port {port}) still there after its SIGKILL");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigkill(pid: u32) {
    signal(pid, "KILL");
}

/// redis-server with an append-only file fsynced on every write: SIGKILL loses nothing.
struct PersistentRedis {
    port: u16,
    dir: TempDir,
    child: Option<ChildGuard>,
}

impl PersistentRedis {
    async fn start() -> Self {
        let port = free_port();
        let mut r = PersistentRedis { port, dir: TempDir::new(&format!("tq-faults-redis-{port}")), child: None };
        r.restart(true).await;
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn kill(&mut self) {
        let pid = self.child.as_ref().map(|c| c.0.id()).expect("redis-server running");
        self.child.take();
        gone(pid, self.port, "redis-server");
    }

    async fn restart(&mut self, keep_data: bool) {
        if !keep_data {
            let _ = std::fs::remove_dir_all(&self.dir.0);
            std::fs::create_dir_all(&self.dir.0).unwrap();
        }
        let bin = std::env::var("TQ_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(&self.dir.0)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(ChildGuard(child));
        let url = self.url();
        wait_for("redis PING", Duration::from_secs(10), || {
            let url = url.clone();
            async move {
                let mut c = redis::Client::open(url).ok()?.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING").query_async::<String>(&mut c).await.ok()
            }
        })
        .await;
    }
}

/// A loopback proxy to Redis for the operator: passes bytes on, delays each chunk, or drops
/// them (connections stay open, nothing arrives: a blackhole).
struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

const PASS: u8 = 0;
const DELAY: u8 = 1;
const DROP: u8 = 2;

impl Proxy {
    async fn start(to: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let m = mode.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else { continue };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, m.clone()));
                tokio::spawn(pump(sr, cw, m.clone()));
            }
        });
        Proxy { port, mode, task }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, mode: Arc<AtomicU8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match mode.load(Ordering::SeqCst) {
            DROP => continue,
            DELAY => tokio::time::sleep(Duration::from_millis(300)).await,
            _ => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The real operator binary against the private cluster.
struct OperatorProcess {
    child: Option<ChildGuard>,
    kubeconfig: PathBuf,
    ns: String,
    log: PathBuf,
}

impl OperatorProcess {
    fn start(kubeconfig: PathBuf, ns: &str) -> Self {
        let log = std::env::temp_dir().join(format!("tq-faults-operator-{ns}.log"));
        let mut o = OperatorProcess { child: None, kubeconfig, ns: ns.into(), log };
        o.restart();
        o
    }

    fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_taskqueue-operator"))
            .args(["run", "--namespace", &self.ns, "--broker-timeout", "1s", "--leader-election=false"])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
            .env("KUBECONFIG", &self.kubeconfig)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(ChildGuard(child));
    }

    fn sigkill(&mut self) {
        let mut child = self.child.take().expect("the operator running");
        sigkill(child.0.id());
        let status = child.0.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "killed by SIGKILL: {status}");
    }

    /// Whether it is still running (it must never exit on its own).
    fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.0.try_wait().unwrap().is_none())
    }
}

/// A real Celery worker on the pool's queue; each task it runs appends its id to a file.
struct CeleryWorker {
    child: Child,
}

impl CeleryWorker {
    fn start(broker: &str, record: &std::path::Path) -> Self {
        let child = python(broker)
            .env("TASK_SCALE", "1")
            .env("TASK_RECORD_FILE", record)
            .args(["-m", "celery", "-A", "app.worker", "worker", &format!("--queues={QUEUE}")])
            .args(["--concurrency=2", "--prefetch-multiplier=1", "-n", "faults@%h"])
            .args(["--loglevel=WARNING", "--without-mingle", "--without-gossip"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        CeleryWorker { child }
    }

    /// SIGTERM (warm shutdown: running tasks finish, prefetched ones go back to the queue).
    fn stop(mut self) {
        signal(self.child.id(), "TERM");
        for _ in 0..300 {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scenario that fails midway leaves no worker behind (it would hold the test's output open).
impl Drop for CeleryWorker {
    fn drop(&mut self) {
        if self.child.try_wait().is_ok_and(|s| s.is_none()) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Replicas of the pool's Deployment over time (polled every 100 ms; an unreachable API server
/// just leaves a gap).
struct Timeline {
    points: Arc<Mutex<Vec<(Instant, i32)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Timeline {
    fn start(client: Client, ns: String, name: &'static str) -> Self {
        let points = Arc::new(Mutex::new(Vec::new()));
        let p = points.clone();
        let task = tokio::spawn(async move {
            let api: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client, &ns);
            loop {
                if let Ok(Some(d)) = api.get_opt(name).await {
                    let r = replicas(&d);
                    let mut p = p.lock().unwrap();
                    if p.last().is_none_or(|(_, last)| *last != r) {
                        p.push((Instant::now(), r));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Timeline { points, task }
    }

    fn stop(self) -> Vec<(Instant, i32)> {
        self.task.abort();
        self.points.lock().unwrap().clone()
    }
}

/// The proxy's fault, seen from a client of its own: a PING answered after the delay, or not
/// answered at all.
async fn proxy_fault_holds(url: &str, fault: Fault) {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let client = redis::Client::open(url).unwrap();
    let ping = async {
        let mut c = client.get_multiplexed_async_connection_with_config(&config).await?;
        redis::cmd("PING").query_async::<String>(&mut c).await
    };
    let started = Instant::now();
    let answered = tokio::time::timeout(Duration::from_secs(3), ping).await;
    match fault {
        Fault::ProxyDelays => {
            assert!(answered.is_ok_and(|r| r.is_ok()), "{fault:?}: a PING through the proxy is answered");
            assert!(started.elapsed() >= Duration::from_millis(300), "{fault:?}: the proxy delayed nothing");
        }
        // Silence: no answer within our 3 s, or redis-rs's own connect timeout first.
        _ => assert!(
            answered.as_ref().map_or(true, |r| r.as_ref().is_err_and(|e| e.is_timeout())),
            "{fault:?}: a PING through the proxy was answered: {answered:?}"
        ),
    }
}

/// Task ids still in Redis: in the queue's priority lists or kombu's `unacked` hash.
async fn ids_in_redis(url: &str) -> BTreeSet<String> {
    let mut c = support::redis_conn(url).await;
    let mut out = BTreeSet::new();
    let id = |message: &Value| message.pointer("/headers/id").and_then(Value::as_str).map(String::from);
    for step in ["", "\x06\x163", "\x06\x166", "\x06\x169"] {
        let items: Vec<String> =
            redis::cmd("LRANGE").arg(format!("{QUEUE}{step}")).arg(0).arg(-1).query_async(&mut c).await.unwrap();
        out.extend(items.iter().filter_map(|m| id(&serde_json::from_str(m).ok()?)));
    }
    let unacked: Vec<String> = redis::cmd("HVALS").arg("unacked").query_async(&mut c).await.unwrap();
    out.extend(unacked.iter().filter_map(|v| id(&serde_json::from_str::<Value>(v).ok()?.get(0)?.clone())));
    out
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    RedisKilled { keep_data: bool },
    ApiServerRestarted,
    EtcdRestarted,
    OperatorKilled,
    ProxyDelays,
    ProxyDrops,
}

impl Fault {
    fn describe(self) -> &'static str {
        match self {
            Fault::RedisKilled { keep_data: false } => "redis-server SIGKILLed for 60 s, restarted empty",
            Fault::RedisKilled { keep_data: true } => "redis-server SIGKILLed for 60 s, restarted with its data",
            Fault::ApiServerRestarted => "kube-apiserver SIGKILLed, restarted after 10 s",
            Fault::EtcdRestarted => "etcd SIGKILLed, restarted after 10 s",
            Fault::OperatorKilled => "operator SIGKILLed, restarted after 5 s",
            Fault::ProxyDelays => "proxy to Redis delays every chunk 300 ms, for 20 s",
            Fault::ProxyDrops => "proxy to Redis drops everything (blackhole), for 20 s",
        }
    }

    fn duration(self) -> Duration {
        Duration::from_secs(match self {
            Fault::RedisKilled { .. } => 60,
            Fault::ApiServerRestarted | Fault::EtcdRestarted => 10,
            Fault::OperatorKilled => 5,
            Fault::ProxyDelays | Fault::ProxyDrops => 20,
        })
    }

    /// The operator has no broker data during the fault (replicas must not move then).
    fn hides_the_broker(self) -> bool {
        matches!(self, Fault::RedisKilled { .. } | Fault::ProxyDrops)
    }

    fn redis_keeps_data(self) -> bool {
        self != Fault::RedisKilled { keep_data: false }
    }
}

struct Outcome {
    fault: Fault,
    /// Replicas when the fault struck, their range during it, and at the end.
    at_fault: i32,
    during: (i32, i32),
    end: i32,
    /// Every value the Deployment had, in order.
    timeline: Vec<i32>,
    changes: usize,
    flaps: usize,
    changes_during: usize,
    converge: Duration,
    sent: usize,
    ran: usize,
    in_redis: usize,
    lost: usize,
}

async fn scenario(cluster: &Cluster, fault: Fault) -> Outcome {
    let client = cluster.client().await;
    let ns = namespace(&client, "fault").await;
    let mut redis = PersistentRedis::start().await;
    let proxy = Proxy::start(redis.port).await;
    let via_proxy = matches!(fault, Fault::ProxyDelays | Fault::ProxyDrops);
    let operator_url = if via_proxy { format!("redis://127.0.0.1:{}/0", proxy.port) } else { redis.url() };
    broker_secret(&client, &ns, &operator_url).await;
    let scaling = json!({"maxReplicas": 10, "pollInterval": "1s", "scaleUp": {"maxStep": 2}, "scaleDown": {"stabilizationWindow": "10s"}});
    let mut tq = pool("pool", QUEUE, scaling.clone());
    tq["spec"]["worker"]["concurrency"] = json!(2);
    create_taskqueue(&client, &ns, tq).await;
    create_taskqueue(&client, &ns, pool("probe", "probe", scaling)).await;
    let mut operator = OperatorProcess::start(cluster.kubeconfig(), &ns);
    wait_replicas(&client, &ns, "pool", 0).await;
    wait_condition(&client, &ns, "probe", "BrokerReachable", "True").await;

    let timeline = Timeline::start(client.clone(), ns.clone(), "pool");
    let record = std::env::temp_dir().join(format!("tq-faults-{ns}.ran"));
    let _ = std::fs::remove_file(&record);
    let worker = CeleryWorker::start(&redis.url(), &record);
    celery(&redis.url(), &["ids", QUEUE, &TASKS.to_string(), "t"]);
    // Mid-scale: a first step is out (of 2 replicas a second towards the 10 the 40 tasks ask for).
    let at_fault = wait_for("the first scale step", Duration::from_secs(60), || async {
        deployment(&client, &ns, "pool").await.map(|d| replicas(&d)).filter(|r| *r > 0)
    })
    .await;

    let fault_start = Instant::now();
    match fault {
        Fault::RedisKilled { .. } => redis.kill(),
        Fault::ApiServerRestarted => cluster.kill("kube-apiserver"),
        Fault::EtcdRestarted => cluster.kill("etcd"),
        Fault::OperatorKilled => operator.sigkill(),
        Fault::ProxyDelays => proxy.set(DELAY),
        Fault::ProxyDrops => proxy.set(DROP),
    }
    if via_proxy {
        proxy_fault_holds(&operator_url, fault).await;
    }
    // From when the operator says the broker is unreadable, nothing may move: a read that was
    // under way when the fault struck can still finish with data from before it.
    let known = if fault.hides_the_broker() {
        wait_condition(&client, &ns, "pool", "BrokerReachable", "False").await;
        Instant::now()
    } else {
        fault_start
    };
    tokio::time::sleep(fault.duration().saturating_sub(fault_start.elapsed())).await;
    // The fault ends when its component is started again (or the proxy passes bytes again); the
    // time to converge includes that start.
    let fault_end = Instant::now();
    match fault {
        Fault::RedisKilled { keep_data } => redis.restart(keep_data).await,
        Fault::ApiServerRestarted => cluster.start("kube-apiserver"),
        Fault::EtcdRestarted => cluster.start("etcd"),
        Fault::OperatorKilled => operator.restart(),
        Fault::ProxyDelays | Fault::ProxyDrops => proxy.set(PASS),
    }

    // Converged: a probe on another TaskQueue is acted on (the operator reads, decides, writes).
    lpush(&redis.url(), "probe", 1).await;
    let probe = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), &ns);
    while probe.get_opt("probe").await.ok().flatten().is_none_or(|d| replicas(&d) != 1) {
        assert!(fault_end.elapsed() < Duration::from_secs(120), "{fault:?}: the operator did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let converge = fault_end.elapsed();
    // Let the pool go on for a while, then stop the worker (warm) and count every task.
    tokio::time::sleep(Duration::from_secs(5)).await;
    worker.stop();
    let points = timeline.stop();
    assert!(operator.running(), "{fault:?}: the operator exited on its own");
    let ran: BTreeSet<String> =
        std::fs::read_to_string(&record).unwrap_or_default().lines().map(String::from).collect();
    let in_redis = ids_in_redis(&redis.url()).await;
    let sent: BTreeSet<String> = (0..TASKS).map(|i| format!("t{i}")).collect();
    let lost = sent.iter().filter(|id| !ran.contains(*id) && !in_redis.contains(*id)).count();
    let _ = std::fs::remove_file(&record);
    drop(operator);
    delete_namespace(&client, &ns).await;

    let during: Vec<i32> = std::iter::once(at_fault)
        .chain(points.iter().filter(|(at, _)| *at > fault_start && *at <= fault_end).map(|(_, r)| *r))
        .collect();
    let steps: Vec<i32> = points.windows(2).map(|w| (w[1].1 - w[0].1).signum()).collect();
    Outcome {
        fault,
        at_fault,
        during: (*during.iter().min().unwrap(), *during.iter().max().unwrap()),
        end: points.last().map_or(0, |p| p.1),
        timeline: points.iter().map(|(_, r)| *r).collect(),
        changes: steps.len(),
        // Scaling up, then down as the queue drains, is the lifecycle; down and then up again
        // is a flap (a scale-down that had to be undone).
        flaps: steps.windows(2).filter(|w| w[0] < 0 && w[1] > 0).count(),
        changes_during: points.iter().filter(|(at, _)| *at > known && *at <= fault_end).count(),
        converge,
        sent: sent.len(),
        ran: sent.iter().filter(|id| ran.contains(*id)).count(),
        in_redis: sent.iter().filter(|id| in_redis.contains(*id) && !ran.contains(*id)).count(),
        lost,
    }
}

// Several threads: the replica timeline keeps polling while the test waits on processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
#[ignore = "needs the local stack: make test"]
async fn fault_suite() {
    let cluster = Cluster::up();
    ensure_crd(&cluster.client().await).await;
    let faults = [
        Fault::RedisKilled { keep_data: false },
        Fault::RedisKilled { keep_data: true },
        Fault::ApiServerRestarted,
        Fault::EtcdRestarted,
        Fault::OperatorKilled,
        Fault::ProxyDelays,
        Fault::ProxyDrops,
    ];
    let mut outcomes = Vec::new();
    for fault in faults {
        let o = scenario(&cluster, fault).await;
        println!(
            "{}: replicas {:?}: {} at the fault, {}..{} during, {} at the end; {} changes, {} flaps; probe after {:.1?}; tasks {} sent, {} ran, {} in Redis, {} lost",
            fault.describe(), o.timeline, o.at_fault, o.during.0, o.during.1, o.end, o.changes, o.flaps, o.converge, o.sent, o.ran, o.in_redis, o.lost
        );
        outcomes.push(o);
    }

    let mut failures = Vec::new();
    let mut rows = Vec::new();
    for o in &outcomes {
        let f = o.fault;
        if o.during.0 == 0 {
            failures.push(format!("{}: replicas went to 0 during the fault", f.describe()));
        }
        if f.hides_the_broker() && o.changes_during > 0 {
            failures.push(format!("{}: replicas changed on missing data ({} changes)", f.describe(), o.changes_during));
        }
        if o.flaps > 0 {
            failures.push(format!("{}: replicas flapped ({} scale-downs undone)", f.describe(), o.flaps));
        }
        if f.redis_keeps_data() && o.lost > 0 {
            failures.push(format!("{}: {} tasks lost although Redis kept its data", f.describe(), o.lost));
        }
        let tasks = if f.redis_keeps_data() {
            format!("{} sent: {} ran, {} in Redis, **{} lost**", o.sent, o.ran, o.in_redis, o.lost)
        } else {
            format!(
                "{} sent: {} ran, {} in Redis, {} went with Redis's data (expected)",
                o.sent, o.ran, o.in_redis, o.lost
            )
        };
        rows.push(format!(
            "| {} | {} | {}..{} | {} | {} | {} ({}) | {} | {:.1} s | {} |",
            f.describe(),
            o.at_fault,
            o.during.0,
            o.during.1,
            if f.hides_the_broker() { o.changes_during.to_string() } else { "— (data present)".into() },
            o.end,
            o.changes,
            o.timeline.iter().map(ToString::to_string).collect::<Vec<_>>().join("→"),
            o.flaps,
            o.converge.as_secs_f64(),
            tasks
        ));
    }
    let table = format!(
        "| fault | replicas at the fault | during the fault (min..max) | changes while the broker was unreadable | at the end | changes in all (values) | flaps (scale-down undone) | probe 0→1 after the fault ends | tasks |\n|---|---|---|---|---|---|---|---|---|\n{}\n",
        rows.join("\n")
    );
    println!("{table}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    support::docs::measured("docs/reliability.md", "faults", &table);
}
