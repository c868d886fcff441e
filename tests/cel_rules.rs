//! The CRD's CEL `x-kubernetes-validations` rules and schema bounds, checked on a modern API
//! server. The local test API server (1.20) has no CEL and drops the rules, so this test starts
//! its own one with `../shared/tools/modern-apiserver.sh` (private state dir, free ports),
//! installs `crd::crd()`, and checks that every invalid TaskQueue below is rejected with HTTP 422
//! and the matching message while the seed TaskQueues are accepted. Without `../shared` (a plain
//! clone) the test cannot run: it records itself as skipped (`support::skipped`), which
//! `make test` counts and prints as skipped, never as passed.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::{json, Value};
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
];

#[tokio::test]
#[ignore = "needs ../shared/tools/modern-apiserver.sh: make test"]
async fn cel_rules_reject_invalid_taskqueues_and_accept_the_seed() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = repo.join("../shared/tools/modern-apiserver.sh");
    if !script.exists() {
        support::skipped(
            "cel_rules_reject_invalid_taskqueues_and_accept_the_seed",
            "../shared/tools/modern-apiserver.sh not present",
        );
        return;
    }
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

/// Server-side apply of `crd::crd()`, then wait until it is Established.
async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = taskqueue_operator::crd::crd();
    let name = crd.metadata.name.clone().unwrap();
    crds.patch(&name, &PatchParams::apply("cel-rules-test").force(), &Patch::Apply(&crd))
        .await
        .expect("the API server accepts the CRD (CEL rules compile within the cost limits)");
    for _ in 0..150 {
        let established = crds.get(&name).await.ok().and_then(|c| c.status?.conditions);
        if established.iter().flatten().any(|c| c.type_ == "Established" && c.status == "True") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("CRD {name} not Established after 30s");
}

/// The API server started by `modern-apiserver.sh up`; dropping it runs `down`, also when the
/// test panics.
struct ModernApiServer {
    script: PathBuf,
    state: PathBuf,
    ports: [u16; 3],
}

impl ModernApiServer {
    fn start(script: PathBuf) -> Self {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
        let server =
            ModernApiServer { script, state: cache.join("taskqueue-operator/modern-state"), ports: free_ports() };
        server.run("build"); // cached after the first run (~/.cache/realk8s-modern)
        server.run("down"); // leftovers of an earlier run that was killed before its own `down`
        server.run("up");
        server
    }

    fn kubeconfig(&self) -> PathBuf {
        self.state.join("kubeconfig")
    }

    async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig()).expect("kubeconfig from `up`");
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("usable kubeconfig");
        Client::try_from(config).expect("client")
    }

    fn command(&self, action: &str) -> Command {
        let [etcd, etcd_peer, api] = self.ports.map(|p| p.to_string());
        let mut cmd = Command::new("bash");
        cmd.arg(&self.script)
            .arg(action)
            .env("REALK8S_STATE", &self.state)
            .env("REALK8S_KUBECONFIG", self.kubeconfig())
            .env("REALK8S_ETCD_PORT", etcd)
            .env("REALK8S_ETCD_PEER_PORT", etcd_peer)
            .env("REALK8S_API_PORT", api)
            .env_remove("REALK8S_ETCD_DIR")
            .env_remove("REALK8S_KEEP_DATA");
        cmd
    }

    fn run(&self, action: &str) {
        let status =
            self.command(action).status().unwrap_or_else(|e| panic!("running modern-apiserver.sh {action}: {e}"));
        assert!(status.success(), "modern-apiserver.sh {action} failed: {status}");
    }
}

impl Drop for ModernApiServer {
    fn drop(&mut self) {
        if let Err(e) = self.command("down").status() {
            eprintln!("modern-apiserver.sh down: {e}");
        }
    }
}

/// Three distinct free loopback ports (all bound at once, so they differ).
fn free_ports() -> [u16; 3] {
    let listeners = [(); 3].map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"));
    listeners.map(|l| l.local_addr().unwrap().port())
}
