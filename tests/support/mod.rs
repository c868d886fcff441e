//! Shared plumbing for the tests that run against the real stack started by
//! `deploy/local/up.sh` (kube-apiserver + controller-manager, redis-server, Celery venv).
//! Each test gets its own namespace, its own redis-server and its own in-process operator.
#![allow(dead_code)]

pub mod docs;
pub mod modern;

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use taskqueue_operator::controller::{self, Settings};
use taskqueue_operator::crd::TaskQueue;

/// Record that test `name` ran but could not check a part of what it covers (`what`), and why:
/// it stays passed, and `make test` prints the part with its reason.
pub fn partly_skipped(name: &str, what: &str, why: &str) {
    record(&format!("partly: {name}: {what}: {why}\n"));
}

/// Record that test `name` could not run and why. `cargo test` can only count it as passed, so
/// `make test` (deploy/local/test.sh) reads these lines from `$TQ_SKIP_FILE`, prints them and
/// counts them as skipped, not passed. The line also goes straight to stderr (not captured).
pub fn skipped(name: &str, why: &str) {
    record(&format!("skipped: {name}: {why}\n"));
}

fn record(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os("TQ_SKIP_FILE") {
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).create(true).open(path) {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: these tests need the local stack; run `make test`, or `deploy/local/up.sh` and `source` the env file it prints")
    })
}

pub async fn client() -> Client {
    require("KUBECONFIG");
    Client::try_default().await.expect("kubeconfig from KUBECONFIG")
}

/// Install the CRD as it is committed (the 1.20 test API server drops the CEL rules on create).
pub async fn ensure_crd(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = taskqueue_operator::crd::crd();
    // Create, or replace a CRD left by an older build (replace keeps the test API server's
    // behaviour of dropping the CEL rules, like create does).
    match api.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let mut crd = crd.clone();
            let current = api.get(crd.metadata.name.as_deref().unwrap()).await.expect("read CRD");
            crd.metadata.resource_version = current.metadata.resource_version;
            match api.replace(crd.metadata.name.as_deref().unwrap(), &PostParams::default(), &crd).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {} // a parallel test just did it
                Err(e) => panic!("replacing CRD: {e}"),
            }
        }
        Err(e) => panic!("creating CRD: {e}"),
    }
    wait_for("CRD established", Duration::from_secs(30), || async {
        let c = api.get("taskqueues.taskqueue.dev").await.ok()?;
        let established = c.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
}

/// Poll `f` every 200 ms until it returns Some, or panic naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A private redis-server on a free loopback port, stoppable and restartable.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    bridge: Option<String>,
}

impl Redis {
    pub async fn start() -> Self {
        let mut r = Redis { port: free_port(), child: None, bridge: None };
        r.restart().await;
        r
    }

    /// Also on the lab's bridge, where worker pods reach it (protected mode off: only the lab's
    /// network namespace can reach that address).
    pub async fn start_for_pods(lab: &Lab) -> Self {
        let mut r = Redis { port: free_port(), child: None, bridge: Some(lab.gateway()) };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The URL a worker pod dials (the lab's bridge address).
    pub fn url_for_pods(&self) -> String {
        format!("redis://{}:{}/0", self.bridge.as_deref().expect("Redis::start_for_pods"), self.port)
    }

    pub async fn restart(&mut self) {
        let bin = std::env::var("TQ_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let bind = match &self.bridge {
            Some(ip) => vec!["--bind", "127.0.0.1", ip.as_str(), "--protected-mode", "no"],
            None => vec!["--bind", "127.0.0.1"],
        };
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--save", "", "--appendonly", "no"])
            .args(bind)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (deploy/local/deps.sh installs it)");
        self.child = Some(child);
        let url = self.url();
        wait_for("redis-server to answer PING", Duration::from_secs(10), || {
            let url = url.clone();
            async move {
                let client = redis::Client::open(url).ok()?;
                let mut c = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING").query_async::<String>(&mut c).await.ok()
            }
        })
        .await;
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A child process killed when the guard drops (also when a test panics), so no server
/// outlives its test and holds the test runner's output open.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run `program` with `args` to the end; its stdout, or a panic with both its outputs.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A pod that is Ready and not being deleted.
pub fn pod_ready(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// One start of a recorded task, as the demo app's `record` task appended it to the broker list
/// `TASK_RECORD_KEY:starts` (the key is `done` in the tests).
#[derive(Debug, serde::Deserialize)]
pub struct Start {
    pub id: String,
    pub worker: String,
    /// Seconds since the epoch, on the worker's clock (this machine's).
    pub t: f64,
    pub redelivered: bool,
}

/// Every start recorded in `done:starts` whose task id begins with `prefix`, in order.
pub async fn starts(url: &str, prefix: &str) -> Vec<Start> {
    let mut c = redis_conn(url).await;
    let all: Vec<String> = redis::cmd("LRANGE").arg("done:starts").arg(0).arg(-1).query_async(&mut c).await.unwrap();
    all.iter().map(|s| serde_json::from_str::<Start>(s).unwrap()).filter(|s| s.id.starts_with(prefix)).collect()
}

/// Seconds since the epoch: the clock the tasks' records use.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The lab's node side (deploy/local/lab.sh, node.sh): its network and the names of the images
/// it built. `None` where the lab has no node (`make test` always has one).
pub struct Lab {
    pub net: String,
}

/// The images deploy/local/images.sh builds and the node has loaded (no registry).
pub const WORKER_IMAGE: &str = "tq.local/celery-worker:1";
pub const OPERATOR_IMAGE: &str = "tq.local/taskqueue-operator:dev";
/// The lab's node runs only pods that tolerate this taint (deploy/local/node.sh says why).
pub const REAL_PODS_TAINT: &str = "tq.lab/real-pods";

impl Lab {
    /// The lab's node, or why there is none: run without the lab, or `up` found that containers
    /// cannot start on this machine (TQ_NODE_UNAVAILABLE).
    pub fn from_env() -> Result<Lab, String> {
        if let Some(why) = std::env::var("TQ_NODE_UNAVAILABLE").ok().filter(|w| !w.is_empty()) {
            return Err(why);
        }
        let net = std::env::var("TQ_LAB_NET").ok().filter(|n| !n.is_empty());
        net.map(|net| Lab { net }).ok_or_else(|| "no lab node (TQ_LAB_NET unset): run it with `make test`".into())
    }

    /// The lab's bridge address: where pods reach the API server and Redis.
    pub fn gateway(&self) -> String {
        format!("{}.1", self.net)
    }

    /// `deploy/local/node.sh ARGS` in the host's mount and network namespaces (the kubelet and
    /// containerd must start there), through the process `make test` names in TQ_HOST_PID.
    /// `None` without it (a test run by hand inside the lab).
    pub fn node_sh(args: &[&str]) -> Option<String> {
        let host = std::env::var("TQ_HOST_PID").ok().filter(|p| !p.is_empty())?;
        let script = repo().join("deploy/local/node.sh");
        let mut all = vec!["-t", host.as_str(), "-m", "-n", "--", "bash", script.to_str().unwrap()];
        all.extend(args);
        Some(run("nsenter", &all))
    }

    /// The toleration a pod needs to run on the lab's node.
    pub fn toleration() -> serde_json::Value {
        json!({"key": REAL_PODS_TAINT, "operator": "Exists", "effect": "NoSchedule"})
    }
}

/// A fresh namespace per test, so tests never see each other's objects.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    // Unique per process (pid) and per call (counter); a name taken by a namespace still
    // terminating (an earlier test, an earlier process with the same pid) is skipped.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let api: Api<Namespace> = Api::all(client.clone());
    loop {
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let ns = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => return name,
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => panic!("create namespace {name}: {e}"),
        }
    }
}

pub async fn delete_namespace(client: &Client, ns: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(ns, &DeleteParams::default()).await;
}

pub async fn broker_secret(client: &Client, ns: &str, url: &str) {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s: Secret =
        serde_json::from_value(json!({"metadata": {"name": "celery-broker"}, "stringData": {"url": url}})).unwrap();
    api.create(&PostParams::default(), &s).await.expect("create broker secret");
}

/// The operator, in process, watching one namespace.
pub struct Operator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), controller::TaskDied>>,
    metrics: std::sync::Arc<taskqueue_operator::metrics::Metrics>,
}

impl Operator {
    pub fn start(client: &Client, ns: &str) -> Self {
        Self::start_with(client, ns, |_| {})
    }

    /// Its `/metrics` text.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    /// As `start`, with the test defaults (1 s broker deadline, 1 s Secret cache) changed by `f`.
    pub fn start_with(client: &Client, ns: &str, f: impl FnOnce(&mut Settings)) -> Self {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut settings = Settings {
            namespaces: vec![ns.to_string()],
            broker_timeout: Duration::from_secs(1),
            secret_ttl: Duration::from_secs(1),
            ..Settings::default()
        };
        f(&mut settings);
        let metrics = settings.metrics.clone();
        let task = tokio::spawn(controller::run(client.clone(), settings, async move {
            let _ = rx.await;
        }));
        Operator { stop: Some(tx), task, metrics }
    }

    /// Stop it, and fail the test if it did not stop cleanly within 10 s, stopped on its own, or
    /// had a reconcile panic on the way (caught by the operator, so visible only in its count).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(Duration::from_secs(10), &mut self.task).await {
            Err(_) => panic!("the operator did not stop within 10 s of being told to"),
            Ok(Err(join)) => panic!("the operator task panicked: {join}"),
            Ok(Ok(Err(died))) => panic!("the operator stopped on its own during the test: {died}"),
            Ok(Ok(Ok(()))) => {}
        }
        let panics = metric(&self.metrics.render(), "taskqueue_reconciles_total{result=\"panicked\"}");
        assert_eq!(panics, 0.0, "reconciles panicked during the test");
    }
}

/// `python deploy/demo/produce.py ARGS...` with the test venv: the real Celery producer.
pub fn celery(broker_url: &str, args: &[&str]) -> String {
    celery_routed(broker_url, None, args)
}

/// As `celery`, with the app's `task_routes` loaded from a routing table JSON file.
pub fn celery_routed(broker_url: &str, routes: Option<&std::path::Path>, args: &[&str]) -> String {
    let mut cmd = python(broker_url);
    if let Some(r) = routes {
        cmd.env("TASK_ROUTES_FILE", r);
    }
    let out = cmd.arg(repo().join("deploy/demo/produce.py")).args(args).output().expect("run produce.py");
    assert!(out.status.success(), "produce.py {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// kombu's own `message_count` for `queue`.
pub fn kombu_count(broker_url: &str, queue: &str) -> i64 {
    let line = celery(broker_url, &["count", queue]);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    v["pending"].as_i64().unwrap()
}

pub fn python(broker_url: &str) -> Command {
    let venv = require("TQ_VENV");
    let mut c = Command::new(PathBuf::from(venv).join("bin/python"));
    c.env("PYTHONPATH", repo().join("deploy/demo")).env("CELERY_BROKER_URL", broker_url).env("TASK_SCALE", "0.01");
    c
}

/// A real Celery worker process running exactly the command line of a worker Deployment.
pub struct Worker(Child);

impl Worker {
    pub fn start(broker_url: &str, command: &[String]) -> Self {
        Self::start_scaled(broker_url, command, "0.01")
    }

    /// As `start`, with the demo tasks' durations multiplied by `task_scale` (`TASK_SCALE`).
    pub fn start_scaled(broker_url: &str, command: &[String], task_scale: &str) -> Self {
        assert_eq!(command[0], "celery");
        let child = python(broker_url)
            .env("TASK_SCALE", task_scale)
            .arg("-m")
            .args(command)
            .args(["--loglevel=WARNING", "--without-mingle", "--without-gossip"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start celery worker");
        Worker(child)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn deployment(client: &Client, ns: &str, name: &str) -> Option<Deployment> {
    Api::<Deployment>::namespaced(client.clone(), ns).get_opt(name).await.unwrap()
}

pub fn replicas(d: &Deployment) -> i32 {
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

pub fn command(d: &Deployment) -> Vec<String> {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].command.clone().unwrap()
}

pub async fn taskqueue(client: &Client, ns: &str, name: &str) -> TaskQueue {
    Api::<TaskQueue>::namespaced(client.clone(), ns).get(name).await.unwrap()
}

pub fn condition(tq: &TaskQueue, type_: &str) -> Option<(String, String, String)> {
    tq.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Events the operator published about `name` with `reason`. Each call of the operator is its
/// own Event (never folded into a series), so counting them counts what was published.
pub async fn events(client: &Client, ns: &str, name: &str, reason: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
    let found: Vec<_> =
        events_of(client, ns, name).await.into_iter().filter(|e| e.reason.as_deref() == Some(reason)).collect();
    for e in &found {
        assert!(e.series.is_none(), "event folded into a series, so the count would hide repeats: {e:?}");
    }
    found
}

/// Every Event the operator published about `name`, whatever its reason.
pub async fn events_of(client: &Client, ns: &str, name: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let all = api.list(&Default::default()).await.unwrap().items;
    all.into_iter().filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)).collect()
}

/// Apply deploy/examples/seed.yaml into `ns` as a user would, the Secret pointing at
/// `broker_url` and every pool polling every 500 ms.
pub async fn apply_seed(client: &Client, ns: &str, broker_url: &str) {
    let manifests = std::fs::read_to_string(repo().join("deploy/examples/seed.yaml")).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&manifests) {
        let mut v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        match v["kind"].as_str() {
            Some("Secret") => {
                let mut s: k8s_openapi::api::core::v1::Secret = serde_json::from_value(v).unwrap();
                s.string_data = Some([("url".to_string(), broker_url.to_string())].into());
                let api = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns);
                api.create(&PostParams::default(), &s).await.unwrap();
            }
            Some("TaskQueue") => {
                v["spec"]["scaling"]["pollInterval"] = json!("500ms");
                create_taskqueue(client, ns, v).await;
            }
            other => panic!("unexpected kind {other:?} in seed.yaml"),
        }
    }
}

/// Create a TaskQueue from JSON in `ns`.
pub async fn create_taskqueue(client: &Client, ns: &str, tq: serde_json::Value) -> TaskQueue {
    let tq: TaskQueue = serde_json::from_value(tq).unwrap();
    Api::<TaskQueue>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &tq)
        .await
        .expect("create TaskQueue")
}

/// A Redis Sentinel on a free loopback port, killed on drop.
pub struct Sentinel {
    pub port: u16,
    // Field order: the process dies before its directory goes.
    _child: ChildGuard,
    _dir: TempDir,
}

impl Sentinel {
    pub async fn start(master: &str, master_port: u16, auth: Option<&str>) -> Self {
        let port = free_port();
        let dir = TempDir::new(&format!("tq-sentinel-{port}"));
        // Sentinel rewrites its config file, so it lives in a writable temp dir.
        let mut conf = format!(
            "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {}\nsentinel monitor {master} 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds {master} 1000\nsentinel failover-timeout {master} 5000\n",
            dir.0.display()
        );
        if let Some(pw) = auth {
            conf.push_str(&format!("sentinel auth-pass {master} {pw}\n"));
        }
        std::fs::write(dir.0.join("sentinel.conf"), conf).unwrap();
        let bin = std::env::var("TQ_REDIS_SENTINEL").unwrap_or_else(|_| "redis-sentinel".into());
        let child = std::process::Command::new(bin)
            .arg(dir.0.join("sentinel.conf"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-sentinel on PATH");
        let s = Sentinel { port, _child: ChildGuard(child), _dir: dir };
        let master = master.to_string();
        wait_for("the sentinel to know its master", Duration::from_secs(10), || {
            let url = format!("redis://127.0.0.1:{port}");
            let master = master.clone();
            async move {
                let mut c = redis::Client::open(url).ok()?.get_multiplexed_async_connection().await.ok()?;
                let addr: Option<(String, String)> = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&master)
                    .query_async(&mut c)
                    .await
                    .ok()?;
                addr.map(|_| ())
            }
        })
        .await;
        s
    }
}

/// A redis-server with a password (and optionally replicating another), killed on drop. Its
/// own temp dir: replication writes an RDB file there even with `--save ""`.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `n` raw entries pushed on list `key` (what the operator counts as pending; no Celery needed).
/// A connection for a test's own commands, with no reply timeout (redis-rs's default is short
/// enough for a loaded 2-core CI machine to trip it: a test's setup must not fail on timing).
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(url).unwrap().get_multiplexed_async_connection_with_config(&config).await.unwrap()
}

pub async fn lpush(url: &str, key: &str, n: usize) {
    let mut c = redis_conn(url).await;
    let items: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    let _: () = redis::cmd("LPUSH").arg(key).arg(items).query_async(&mut c).await.unwrap();
}

/// How long the end-to-end waits give the operator.
pub const T: Duration = Duration::from_secs(60);

/// A TaskQueue `name` on `queue` (concurrency 4, node name `<name>-worker`) with `scaling`.
pub fn pool(name: &str, queue: &str, scaling: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue",
        "metadata": {"name": name},
        "spec": {
            "queue": queue,
            "broker": {"urlSecretRef": {"name": "celery-broker", "key": "url"}},
            "worker": {"image": "example/celery-app:1.0", "app": "app.worker", "concurrency": 4, "nodeName": format!("{name}-worker")},
            "scaling": scaling
        }
    })
}

/// Wait until condition `type_` of the TaskQueue has `status` (the status write follows the
/// Deployment write, so right after `wait_replicas` it may not be there yet).
pub async fn wait_condition(
    client: &kube::Client,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
) -> (TaskQueue, String) {
    wait_for(&format!("{ns}/{name} {type_}={status}"), T, || async {
        let t = taskqueue(client, ns, name).await;
        let c = condition(&t, type_).filter(|c| c.0 == status)?;
        Some((t, c.2))
    })
    .await
}

pub async fn wait_replicas(client: &kube::Client, ns: &str, name: &str, want: i32) {
    wait_for(&format!("{ns}/{name} at {want} replicas"), T, || async {
        deployment(client, ns, name).await.filter(|d| replicas(d) == want).map(|_| ())
    })
    .await;
}

pub async fn routes_configmap(client: &kube::Client, ns: &str) -> Option<String> {
    let cm = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), ns)
        .get_opt("celery-task-routes")
        .await
        .unwrap()?;
    cm.data?.get("task_routes.json").cloned()
}

/// `GET path` on the operator's metrics port: (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    http_get_at("127.0.0.1", port, path)
}

/// `GET path` on `host:port`: (status code, body).
pub fn http_get_at(host: &str, port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect((host, port)).expect("port open");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let code = response.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// The value of one series (`name{labels}`) in an exposition; 0 when absent.
/// The value of `series` (its name and labels, exactly) in an exposition. A missing series
/// fails the test: it must never read as 0.
pub fn metric(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no series {series} in:\n{exposition}"))
}

/// Every API write counted in an exposition (`taskqueue_api_writes_total`, each kind's series
/// required).
pub fn api_writes(exposition: &str) -> f64 {
    taskqueue_operator::metrics::WRITE_KINDS
        .iter()
        .map(|kind| metric(exposition, &format!("taskqueue_api_writes_total{{kind=\"{kind}\"}}")))
        .sum()
}
