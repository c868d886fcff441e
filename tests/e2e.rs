//! End to end against the real stack: kube-apiserver + kube-controller-manager, redis-server,
//! real Celery producers and workers. Marked `#[ignore]` so a bare `cargo test` without the
//! stack reports them as ignored; `make test` starts the stack and runs them.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::Api;
use serde_json::json;
use support::*;
use taskqueue_operator::controller::deletion_cost::DELETION_COST;
use taskqueue_operator::crd::TaskQueue;

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn seed_manifests_become_four_worker_pools_that_follow_the_queues() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "seed").await;
    let redis = Redis::start().await;

    apply_seed(&client, &ns, &redis.url()).await;
    let operator = Operator::start(&client, &ns);

    let want = [
        ("urgent", "celery -A app.worker worker --queues=urgent --concurrency=1 -n urgent-worker@%h", 1),
        ("ai-processing", "celery -A app.worker worker --queues=ai_processing --concurrency=2 -n ai-worker@%h --prefetch-multiplier=1", 0),
        ("demo-tasks", "celery -A app.worker worker --queues=demo_tasks --concurrency=4 -n demo-worker@%h", 0),
        ("general", "celery -A app.worker worker --queues=celery,reports,notifications --concurrency=3 -n general-worker@%h", 1),
    ];
    for (name, cmd, min) in want {
        let d = wait_for(&format!("Deployment {name}"), T, || deployment(&client, &ns, name)).await;
        assert_eq!(command(&d).join(" "), cmd, "{name}");
        wait_replicas(&client, &ns, name, min).await;
    }

    // The namespace's routing table: exactly what `routes -f seed.yaml` prints, all accepted.
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_taskqueue-operator"))
        .arg("routes")
        .arg("-f")
        .arg(repo().join("deploy/examples/seed.yaml"))
        .output()
        .unwrap();
    let want_table = String::from_utf8(cli.stdout).unwrap();
    let cm = wait_for("ConfigMap celery-task-routes", T, || routes_configmap(&client, &ns)).await;
    assert_eq!(format!("{cm}\n"), want_table);
    let from_cluster = std::process::Command::new(env!("CARGO_BIN_EXE_taskqueue-operator"))
        .args(["routes", "--cluster", "--namespace", &ns])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(from_cluster.stdout).unwrap(), want_table, "routes --cluster reads the same table");
    for (name, _, _) in want {
        let accepted = wait_for(&format!("{name} RoutesAccepted"), T, || async {
            condition(&taskqueue(&client, &ns, name).await, "RoutesAccepted")
        })
        .await;
        assert_eq!(accepted.0, "True", "{name}: {accepted:?}");
    }

    // The Celery app loads the ConfigMap's table (`task_routes = (json.load(f),)`) and sends
    // 6 x the seed's register_user: 12 demo_tasks messages, 6 ai_processing messages.
    let routes_file = std::env::temp_dir().join(format!("{ns}-task_routes.json"));
    std::fs::write(&routes_file, &cm).unwrap();
    celery_routed(&redis.url(), Some(&routes_file), &["register", "6"]);
    celery_routed(&redis.url(), Some(&routes_file), &["send", "app.worker.tasks.reports.build_monthly_report", "7"]);
    for (name, queue, kombu_queues, replicas_want) in [
        ("demo-tasks", "demo_tasks", vec!["demo_tasks"], 3), // ceil(12 / 4)
        ("ai-processing", "ai_processing", vec!["ai_processing"], 3), // ceil(6 / 2)
        ("general", "celery", vec!["celery", "reports", "notifications"], 3), // ceil(7 / 3)
    ] {
        let kombu: i64 = kombu_queues.iter().map(|q| kombu_count(&redis.url(), q)).sum();
        assert!(kombu > 0, "{queue}: producer put messages in Redis");
        let tq = wait_for(&format!("{name} status.pending = {kombu}"), T, || async {
            Some(taskqueue(&client, &ns, name).await)
                .filter(|t| t.status.as_ref().and_then(|s| s.pending) == Some(kombu))
        })
        .await;
        assert_eq!(tq.status.as_ref().unwrap().desired_replicas, Some(replicas_want), "{name}");
        wait_replicas(&client, &ns, name, replicas_want).await;
    }
    assert_eq!(replicas(&deployment(&client, &ns, "urgent").await.unwrap()), 1, "urgent untouched");

    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn priorities_are_counted_like_kombu_and_a_drained_queue_returns_to_min_after_the_window() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "prio").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    create_taskqueue(
        &client,
        &ns,
        pool("demo", "demo_tasks", json!({"minReplicas": 0, "maxReplicas": 10, "pollInterval": "500ms", "scaleDown": {"stabilizationWindow": "8s"}})),
    )
    .await;
    let operator = Operator::start(&client, &ns);
    wait_replicas(&client, &ns, "demo", 0).await;

    let task = "app.worker.tasks.demo_tasks.simple_calculation";
    celery(&redis.url(), &["send", task, "9"]); // no priority -> demo_tasks
    celery(&redis.url(), &["send", task, "6", "4"]); // priority 4 -> demo_tasks\x06\x163
    celery(&redis.url(), &["send", task, "5", "9"]); // priority 9 -> demo_tasks\x06\x169
    let kombu = kombu_count(&redis.url(), "demo_tasks");
    assert_eq!(kombu, 20);

    // The CLI reads the same numbers, split by priority list.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_taskqueue-operator"))
        .args(["depth", "--broker-url", &redis.url(), "--queue", "demo_tasks"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        line,
        json!({"queue": "demo_tasks", "pending": 20, "byPriority": {"0": 9, "3": 6, "6": 0, "9": 5}, "inFlight": 0, "scheduled": 0})
    );

    wait_for("status.pending = kombu's count", T, || async {
        Some(taskqueue(&client, &ns, "demo").await).filter(|t| t.status.as_ref().and_then(|s| s.pending) == Some(kombu))
    })
    .await;
    wait_replicas(&client, &ns, "demo", 5).await; // ceil(20 / 4)

    // A real worker with the Deployment's own command line drains the queue.
    let d = deployment(&client, &ns, "demo").await.unwrap();
    let worker = Worker::start(&redis.url(), &command(&d));
    wait_for("queue drained and nothing in flight", T, || async {
        Some(taskqueue(&client, &ns, "demo").await)
            .filter(|t| t.status.as_ref().is_some_and(|s| s.pending == Some(0) && s.in_flight == Some(0)))
    })
    .await;
    // Drained, the operator keeps workers until the 8 s window is out, and says so (an order of
    // events, not a time: however long the drain took, this state comes before the scale-down).
    let waiting = wait_for("the scale-down waiting out the window", T, || async {
        let t = taskqueue(&client, &ns, "demo").await;
        let (_, _, why) = condition(&t, "ScalingLimited")?;
        why.contains("waits out the 8s stabilization window").then_some(t)
    })
    .await;
    assert!(waiting.status.unwrap().desired_replicas.is_some_and(|r| r > 0), "workers kept meanwhile");
    drop(worker);
    wait_replicas(&client, &ns, "demo", 0).await;
    // The status follows the Deployment write; the way down may pass through a partial
    // recommendation seen while the worker drained (5 -> 2 -> 0).
    wait_for("lastScaleReason of the scale-down to 0", T, || async {
        let t = taskqueue(&client, &ns, "demo").await;
        let reason = t.status?.last_scale_reason?;
        (reason.starts_with("scaled down ") && reason.contains(" -> 0: 0 pending")).then_some(())
    })
    .await;
    assert!(!events(&client, &ns, "demo", "ScaledDown").await.is_empty());
    assert!(!events(&client, &ns, "demo", "ScaledUp").await.is_empty());

    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn redis_outage_freezes_replicas_and_recovers() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "outage").await;
    let mut redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    create_taskqueue(
        &client,
        &ns,
        pool(
            "ai",
            "ai_processing",
            json!({"maxReplicas": 10, "pollInterval": "500ms", "scaleDown": {"stabilizationWindow": "1s"}}),
        ),
    )
    .await;
    let operator = Operator::start(&client, &ns);

    celery(&redis.url(), &["send", "app.worker.tasks.ai_tasks.run_ai_text_generation", "8"]);
    wait_replicas(&client, &ns, "ai", 2).await;

    // The timeline is printed at the end (`--nocapture`), for the record.
    let t0 = std::time::Instant::now();
    let mut timeline = vec![(0.0, "redis-server stopped (SIGKILL)".to_string())];
    redis.stop();
    let tq = wait_for("BrokerReachable=False", T, || async {
        let t = taskqueue(&client, &ns, "ai").await;
        condition(&t, "BrokerReachable").filter(|c| c.0 == "False").map(|_| t)
    })
    .await;
    let (_, reason, message) = condition(&tq, "BrokerReachable").unwrap();
    timeline.push((t0.elapsed().as_secs_f64(), format!("condition BrokerReachable=False {reason}: {message}")));
    assert_eq!(reason, "BrokerUnreachable", "{message}");
    assert!(message.contains(&format!("127.0.0.1:{}", redis.port)), "{message}");
    // Several polls later, still frozen (the window is 1 s, so a decision on missing data
    // would have scaled down by now) and one event for the transition, not one per poll.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(replicas(&deployment(&client, &ns, "ai").await.unwrap()), 2);
    assert_eq!(events(&client, &ns, "ai", "BrokerUnreachable").await.len(), 1);

    timeline.push((t0.elapsed().as_secs_f64(), "replicas still 2 after 4 s more; 1 BrokerUnreachable event".into()));

    redis.restart().await; // empty: no persistence
    timeline.push((t0.elapsed().as_secs_f64(), "redis-server restarted; 12 tasks sent".into()));
    celery(&redis.url(), &["send", "app.worker.tasks.ai_tasks.run_ai_text_generation", "12"]);
    wait_replicas(&client, &ns, "ai", 3).await;
    timeline.push((t0.elapsed().as_secs_f64(), "Deployment at 3 replicas".into()));
    let (tq, _) = wait_condition(&client, &ns, "ai", "BrokerReachable", "True").await;
    let (_, reason, message) = condition(&tq, "BrokerReachable").unwrap();
    timeline.push((t0.elapsed().as_secs_f64(), format!("condition BrokerReachable=True {reason}: {message}")));
    wait_for("the ScaledUp event of the recovery", T, || async {
        let up = events(&client, &ns, "ai", "ScaledUp").await;
        up.iter().any(|e| e.note.as_deref().is_some_and(|n| n.starts_with("scaled up 2 -> 3"))).then_some(())
    })
    .await;
    let all = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns);
    for e in all.list(&Default::default()).await.unwrap().items {
        let at = e.event_time.map(|t| t.0.to_string()).unwrap_or_default();
        eprintln!(
            "event {at} {} {}: {}",
            e.type_.unwrap_or_default(),
            e.reason.unwrap_or_default(),
            e.note.unwrap_or_default()
        );
    }
    for (t, what) in timeline {
        eprintln!("t+{t:5.1}s {what}");
    }

    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn deleting_a_taskqueue_garbage_collects_its_deployment() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "gc").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    create_taskqueue(&client, &ns, pool("urgent", "urgent", json!({"minReplicas": 1, "pollInterval": "500ms"}))).await;
    let operator = Operator::start(&client, &ns);
    let d = wait_for("Deployment", T, || deployment(&client, &ns, "urgent")).await;
    assert_eq!(d.metadata.owner_references.as_ref().unwrap()[0].kind, "TaskQueue");

    Api::<TaskQueue>::namespaced(client.clone(), &ns).delete("urgent", &DeleteParams::default()).await.unwrap();
    wait_for("Deployment garbage-collected", T, || async {
        deployment(&client, &ns, "urgent").await.is_none().then_some(())
    })
    .await;

    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn an_invalid_taskqueue_is_reported_and_others_are_unaffected() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "invalid").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    // min > max: the 1.20 API server has no CEL, so only the operator can catch this.
    create_taskqueue(
        &client,
        &ns,
        pool("broken", "broken", json!({"minReplicas": 5, "maxReplicas": 2, "pollInterval": "500ms"})),
    )
    .await;
    create_taskqueue(&client, &ns, pool("fine", "fine", json!({"minReplicas": 0, "pollInterval": "500ms"}))).await;
    let operator = Operator::start(&client, &ns);

    let broken = wait_for("SpecValid=False", T, || async {
        let t = taskqueue(&client, &ns, "broken").await;
        condition(&t, "SpecValid").filter(|c| c.0 == "False").map(|_| t)
    })
    .await;
    let (_, reason, message) = condition(&broken, "SpecValid").unwrap();
    assert_eq!(reason, "InvalidSpec");
    assert!(message.contains("spec.scaling.minReplicas: 5 must not exceed spec.scaling.maxReplicas (2)"), "{message}");
    assert_eq!(events(&client, &ns, "broken", "InvalidSpec").await.len(), 1);

    // The valid neighbour works normally.
    celery(&redis.url(), &["sendq", "fine", "1"]);
    wait_replicas(&client, &ns, "fine", 1).await;
    assert!(deployment(&client, &ns, "broken").await.is_none(), "no workload for an invalid spec");

    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

/// A tenant who may create TaskQueues but not Deployments cannot use the operator to run a pod
/// that shares the node's namespaces, mounts its filesystem or runs with another
/// ServiceAccount: the TaskQueue says which field the pod policy refused, and nothing is
/// written; once the platform allows those kinds (`--pod-policy-allow`), the same TaskQueue
/// gets its Deployment with them.
#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn a_pod_template_beyond_the_pod_policy_is_refused_until_the_platform_allows_it() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "policy").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    let mut tq = pool("escape", "escape", json!({"minReplicas": 1, "pollInterval": "500ms"}));
    tq["spec"]["worker"]["podTemplate"] = json!({"spec": {
        "hostPID": true, "serviceAccountName": "builder",
        "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
        "containers": [{"name": "worker", "volumeMounts": [{"name": "root", "mountPath": "/host"}]}]
    }});
    create_taskqueue(&client, &ns, tq).await;
    let operator = Operator::start(&client, &ns);
    let refused = wait_for("SpecValid=False", T, || async {
        let t = taskqueue(&client, &ns, "escape").await;
        condition(&t, "SpecValid").filter(|c| c.0 == "False").map(|c| c.2)
    })
    .await;
    for field in
        ["podTemplate.spec.hostPID", "podTemplate.spec.serviceAccountName", "podTemplate.spec.volumes[0].hostPath"]
    {
        assert!(refused.contains(&format!("spec.worker.{field}: ")), "{field} named in: {refused}");
    }
    assert!(refused.contains("pod policy refuses") && refused.contains("podPolicy.allowHostPath"), "{refused}");
    assert!(deployment(&client, &ns, "escape").await.is_none(), "nothing written for a refused template");
    operator.stop().await;

    let allowed = taskqueue_operator::pod_policy::PodPolicy::parse_allow("host-namespaces,host-path,service-account");
    let operator = Operator::start_with(&client, &ns, |s| s.pod_policy = allowed.unwrap());
    let d = wait_for("the Deployment once allowed", T, || async { deployment(&client, &ns, "escape").await }).await;
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!((pod.host_pid, pod.service_account_name.as_deref()), (Some(true), Some("builder")));
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

/// With `--broker-allow`, a TaskQueue whose Secret names another address is told so
/// (`BrokerNotAllowed`) and the operator never connects there, while a TaskQueue on an allowed
/// broker is read and scaled as usual.
#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn a_broker_outside_the_allowed_addresses_is_never_dialled() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "allow").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    // Somewhere else on this host: counts every connection it gets.
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = elsewhere.local_addr().unwrap().port();
    elsewhere.set_nonblocking(true).unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let other =
        json!({"metadata": {"name": "other-broker"}, "stringData": {"url": format!("redis://127.0.0.1:{port}/0")}});
    secrets.create(&Default::default(), &serde_json::from_value(other).unwrap()).await.unwrap();
    create_taskqueue(&client, &ns, pool("allowed", "allowedq", json!({"minReplicas": 0, "pollInterval": "500ms"})))
        .await;
    let mut tq = pool("scanner", "scannerq", json!({"minReplicas": 0, "pollInterval": "500ms"}));
    tq["spec"]["broker"]["urlSecretRef"]["name"] = json!("other-broker");
    create_taskqueue(&client, &ns, tq).await;
    let allow = taskqueue_operator::broker::allow::BrokerAllow::parse(&format!("127.0.0.1:{}", redis.port)).unwrap();
    let operator = Operator::start_with(&client, &ns, |s| s.broker_allow = allow);

    let refused = wait_for("BrokerReachable=False on scanner", T, || async {
        let t = taskqueue(&client, &ns, "scanner").await;
        condition(&t, "BrokerReachable").filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(refused.1, "BrokerNotAllowed", "{refused:?}");
    assert!(refused.2.contains(&format!("127.0.0.1:{port}")) && refused.2.contains("brokerAllow"), "{refused:?}");
    celery(&redis.url(), &["sendq", "allowedq", "1"]);
    wait_replicas(&client, &ns, "allowed", 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // several polls of both
    assert!(elsewhere.accept().is_err(), "the operator connected to a broker it may not use");
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn an_existing_deployment_is_only_scaled_and_its_worker_command_checked() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "adopt").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    // The app's own Deployment, as its chart would write it (no replicas: the chart leaves them
    // to the autoscaler).
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let own = json!({
        "metadata": {"name": "app-worker", "labels": {"app": "celery-app"}},
        "spec": {
            "selector": {"matchLabels": {"app": "celery-app", "role": "worker"}},
            "template": {
                "metadata": {"labels": {"app": "celery-app", "role": "worker"}},
                "spec": {"containers": [
                    {"name": "statsd", "image": "example/statsd:1"},
                    {"name": "app", "image": "example/celery-app:1.0",
                     "command": ["opentelemetry-instrument", "python", "-m", "celery"],
                     "args": ["-A", "app.worker", "worker", "-Q", "adoptq", "-c", "2", "-n", "app@%h"]}
                ]}
            }
        }
    });
    let before = deployments.create(&Default::default(), &serde_json::from_value(own).unwrap()).await.unwrap();
    let mut tq = pool(
        "adopt",
        "adoptq",
        json!({"minReplicas": 0, "pollInterval": "500ms", "scaleDown": {"stabilizationWindow": "0s"}}),
    );
    tq["spec"].as_object_mut().unwrap().remove("worker");
    tq["spec"]["scaleTargetRef"] = json!({"name": "app-worker"});
    create_taskqueue(&client, &ns, tq).await;
    let operator = Operator::start(&client, &ns);

    // 5 waiting at -c 2 (tasksPerReplica from the command): 3 replicas.
    celery(&redis.url(), &["sendq", "adoptq", "5"]);
    wait_replicas(&client, &ns, "app-worker", 3).await;
    let matches = wait_for("WorkerMatches=True", T, || async {
        condition(&taskqueue(&client, &ns, "adopt").await, "WorkerMatches").filter(|c| c.0 == "True")
    })
    .await;
    assert!(matches.2.contains("container app runs `celery worker` on adoptq with concurrency 2"), "{matches:?}");
    assert!(matches.2.contains("named app@<pod name>"), "{matches:?}");
    let after = deployment(&client, &ns, "app-worker").await.unwrap();
    let template = |d: &Deployment| serde_json::to_value(&d.spec.as_ref().unwrap().template).unwrap();
    assert_eq!(template(&after), template(&before), "the app's template is never written");
    assert_eq!(after.metadata.labels, before.metadata.labels, "no label of ours on the app's Deployment");
    assert!(after.metadata.owner_references.is_none(), "not taken over");
    let ours: Vec<String> = after
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some("taskqueue-operator"))
        .map(|m| m.fields_v1.as_ref().map(|f| f.0.to_string()).unwrap_or_default())
        .collect();
    assert_eq!(ours, [r#"{"f:spec":{"f:replicas":{}}}"#], "the operator's fields: replicas alone");
    assert!(deployment(&client, &ns, "adopt").await.is_none(), "no worker Deployment of its own");

    // The app's chart moves the workers to another queue: said, and the count is kept.
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "app",
        "args": ["-A", "app.worker", "worker", "-Q", "other", "-c", "2", "-n", "app@%h"]}]}}}});
    deployments.patch("app-worker", &PatchParams::default(), &Patch::Strategic(&patch)).await.unwrap();
    let mismatch = wait_for("WorkerMatches=False", T, || async {
        condition(&taskqueue(&client, &ns, "adopt").await, "WorkerMatches").filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(mismatch.1, "WorkerMismatch");
    assert!(mismatch.2.contains("do not consume adoptq (their -Q is other)"), "{mismatch:?}");
    assert!(mismatch.2.contains("also consume other") && mismatch.2.contains("spec.extraQueues"), "{mismatch:?}");
    let ready = condition(&taskqueue(&client, &ns, "adopt").await, "Ready").unwrap();
    assert_eq!((ready.0.as_str(), ready.1.as_str()), ("False", "WorkerMismatch"), "{ready:?}");
    assert_eq!(replicas(&deployment(&client, &ns, "app-worker").await.unwrap()), 3);

    // Deleting the TaskQueue leaves the app's Deployment where it is.
    Api::<TaskQueue>::namespaced(client.clone(), &ns).delete("adopt", &Default::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(deployment(&client, &ns, "app-worker").await.is_some(), "the app's Deployment is not garbage-collected");
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn two_installations_on_one_namespace_say_so_and_only_one_writes() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "twice").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    let mut tq = pool("both", "bothq", json!({"minReplicas": 0, "pollInterval": "500ms"}));
    tq["spec"]["routes"] = json!([{"pattern": "app.both.*"}]);
    create_taskqueue(&client, &ns, tq).await;
    let a = Operator::start_with(&client, &ns, |s| s.status_manager = "taskqueue-operator@ops/a".into());
    celery(&redis.url(), &["sendq", "bothq", "4"]);
    wait_replicas(&client, &ns, "both", 1).await;
    // A second installation watching the same namespace, with settings of its own (its routes
    // ConfigMap's name, which its RoutesAccepted names): its status differs from a's, so both
    // write (two installations that agree on every word write nothing, and do no harm).
    let b = Operator::start_with(&client, &ns, |s| {
        s.status_manager = "taskqueue-operator@team/b".into();
        s.routes_configmap = "celery-task-routes-b".into();
    });
    // b sees a's status writes (made after b started): it stands back and says so once.
    let b_said = || async {
        let all = events(&client, &ns, "both", "OtherInstallation").await;
        all.into_iter().filter_map(|e| e.note).filter(|n| n.contains("this one stands back")).collect::<Vec<_>>()
    };
    let stood_back = wait_for("b's OtherInstallation Event", T, || async {
        let notes = b_said().await;
        (!notes.is_empty()).then_some(notes)
    })
    .await;
    assert!(stood_back[0].contains("taskqueue-operator@ops/a"), "{stood_back:?}");
    let b_writes = || metric(&b.metrics_text(), "taskqueue_api_writes_total{kind=\"status\"}");
    let b_deployment_writes = || metric(&b.metrics_text(), "taskqueue_api_writes_total{kind=\"deployment\"}");
    let (status_before, deployment_before) = (b_writes(), b_deployment_writes());
    // From now on only a writes: more work scales the pool, b writes neither status nor Deployment.
    celery(&redis.url(), &["sendq", "bothq", "8"]);
    wait_replicas(&client, &ns, "both", 3).await;
    let tq = wait_for("a's status: 12 pending", T, || async {
        Some(taskqueue(&client, &ns, "both").await).filter(|t| t.status.as_ref().and_then(|s| s.pending) == Some(12))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!((b_writes(), b_deployment_writes()), (status_before, deployment_before), "b wrote nothing since");
    assert_eq!(b_said().await.len(), 1, "said once");
    // a says so too when b had written before standing back (then a saw b's field manager);
    // when b saw a's write first it never wrote, and a had nothing to see.
    if status_before > 0.0 {
        let conflict = condition(&tq, "InstallationConflict").expect("a names b");
        assert!(conflict.2.contains("taskqueue-operator@team/b"), "{conflict:?}");
    }
    println!("b wrote {status_before} status(es) before it stood back");
    b.stop().await;
    a.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn a_pattern_claimed_twice_goes_to_the_older_taskqueue() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "routes").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    let with_route = |name: &str, queue: &str| {
        let mut tq = pool(name, queue, json!({"pollInterval": "500ms"}));
        tq["spec"]["routes"] = json!([{"pattern": "app.tasks.*"}, {"pattern": format!("app.{name}.*")}]);
        tq
    };
    create_taskqueue(&client, &ns, with_route("first", "q_first")).await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // creationTimestamp has 1 s resolution
    create_taskqueue(&client, &ns, with_route("second", "q_second")).await;
    let operator = Operator::start(&client, &ns);

    let second = wait_for("RoutesAccepted=False on the newer TaskQueue", T, || async {
        condition(&taskqueue(&client, &ns, "second").await, "RoutesAccepted").filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(second.1, "RouteConflict");
    assert!(
        second.2.contains(&format!("\"app.tasks.*\" left out: pattern already claimed by TaskQueue {ns}/first")),
        "{second:?}"
    );
    assert_eq!(events(&client, &ns, "second", "RouteConflict").await.len(), 1);
    let first = condition(&taskqueue(&client, &ns, "first").await, "RoutesAccepted").unwrap();
    assert_eq!(first.0, "True", "the older object keeps its route: {first:?}");
    let table = wait_for("table with both objects", T, || async {
        routes_configmap(&client, &ns).await.filter(|t| t.contains("app.second.*"))
    })
    .await;
    assert!(table.contains(r#"["app.tasks.*",{"queue":"q_first"}]"#), "{table}");
    assert_eq!(table.matches("\"app.tasks.*\"").count(), 1, "the pattern is published once: {table}");

    // The winner goes away: the other one's route is published and accepted.
    let api = Api::<TaskQueue>::namespaced(client.clone(), &ns);
    api.delete("first", &DeleteParams::default()).await.unwrap();
    wait_for("route handed over", T, || async {
        routes_configmap(&client, &ns).await.filter(|t| t.contains(r#"["app.tasks.*",{"queue":"q_second"}]"#))
    })
    .await;
    wait_for("RoutesAccepted=True after the handover", T, || async {
        condition(&taskqueue(&client, &ns, "second").await, "RoutesAccepted").filter(|c| c.0 == "True")
    })
    .await;
    // No TaskQueue left: no table.
    api.delete("second", &DeleteParams::default()).await.unwrap();
    wait_for("ConfigMap deleted", T, || async { routes_configmap(&client, &ns).await.is_none().then_some(()) }).await;

    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn unacked_work_keeps_one_worker_even_when_the_queue_is_empty() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "guard").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    // countInFlight off: only the guard can keep a replica here.
    let scaling = json!({"minReplicas": 0, "pollInterval": "500ms", "countInFlight": false, "scaleDown": {"stabilizationWindow": "1s"}});
    create_taskqueue(&client, &ns, pool("eta", "eta_q", scaling)).await;
    let operator = Operator::start(&client, &ns);
    wait_replicas(&client, &ns, "eta", 0).await;

    // A real worker takes 3 countdown tasks: the list empties, the messages sit in `unacked`.
    celery(&redis.url(), &["later", "eta_q", "3", "300"]);
    wait_replicas(&client, &ns, "eta", 1).await;
    let d = deployment(&client, &ns, "eta").await.unwrap();
    let worker = Worker::start(&redis.url(), &command(&d));
    let held = wait_for("3 scheduled, 0 in flight or pending", T, || async {
        Some(taskqueue(&client, &ns, "eta").await).filter(|t| {
            t.status.as_ref().is_some_and(|s| s.pending == Some(0) && s.in_flight == Some(0) && s.scheduled == Some(3))
        })
    })
    .await;
    // The worker dies without restoring them (SIGKILL): still one replica, and the reason says why.
    drop(worker);
    tokio::time::sleep(Duration::from_secs(3)).await; // several polls, past the 1 s window
    assert_eq!(replicas(&deployment(&client, &ns, "eta").await.unwrap()), 1);
    assert_eq!(held.status.unwrap().desired_replicas, Some(1), "before the kill");
    let after = taskqueue(&client, &ns, "eta").await;
    assert_eq!(after.status.as_ref().unwrap().desired_replicas, Some(1), "after the kill");
    let (status, _, why) = condition(&after, "ScalingLimited").unwrap();
    assert_eq!(status, "True");
    assert!(why.contains("holding 1 replica: 3 unacked message(s) need a running worker"), "{why}");
    assert!(why.contains("3 scheduled beyond etaHorizon, not counted"), "{why}");

    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn a_paused_pool_keeps_its_replicas_while_its_template_still_reconciles() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "pause").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    let mut tq = pool("ai", "ai_processing", json!({"maxReplicas": 10, "pollInterval": "500ms"}));
    tq["metadata"]["annotations"] = json!({"taskqueue.dev/paused": "true"});
    create_taskqueue(&client, &ns, tq).await;
    let operator = Operator::start(&client, &ns);
    wait_replicas(&client, &ns, "ai", 0).await;

    // 12 tasks / 4 per replica would be 3 replicas: paused, it stays at 0.
    celery(&redis.url(), &["send", "app.worker.tasks.ai_tasks.run_ai_text_generation", "12"]);
    let t = wait_for("pending 12 seen while paused", T, || async {
        Some(taskqueue(&client, &ns, "ai").await).filter(|t| t.status.as_ref().and_then(|s| s.pending) == Some(12))
    })
    .await;
    let (status, _, message) = condition(&t, "Paused").unwrap();
    assert_eq!(status, "True", "{message}");
    assert!(message.contains("taskqueue.dev/paused=true"), "{message}");
    assert_eq!(t.status.as_ref().unwrap().desired_replicas, Some(0));
    // The worker template still follows the spec.
    let api: Api<TaskQueue> = Api::namespaced(client.clone(), &ns);
    let merge = |v: serde_json::Value| kube::api::Patch::Merge(v);
    api.patch("ai", &Default::default(), &merge(json!({"spec": {"worker": {"concurrency": 6}}}))).await.unwrap();
    wait_for("concurrency 6 in the worker command", T, || async {
        deployment(&client, &ns, "ai").await.filter(|d| command(d).contains(&"--concurrency=6".to_string()))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(replicas(&deployment(&client, &ns, "ai").await.unwrap()), 0, "still paused");
    assert_eq!(events(&client, &ns, "ai", "Paused").await.len(), 1);

    // Unpaused: replicas follow the queue again (12 / 6 per replica).
    let unpause = json!({"metadata": {"annotations": {"taskqueue.dev/paused": null}}});
    api.patch("ai", &Default::default(), &merge(unpause)).await.unwrap();
    wait_replicas(&client, &ns, "ai", 2).await;
    wait_condition(&client, &ns, "ai", "Paused", "False").await;
    assert_eq!(events(&client, &ns, "ai", "Resumed").await.len(), 1);

    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn scale_in_gives_idle_workers_the_lowest_deletion_cost() {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::watcher;

    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "idle").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    let mut tq = pool(
        "ai",
        "ai_processing",
        json!({"minReplicas": 3, "maxReplicas": 3, "tasksPerReplica": 1, "pollInterval": "500ms", "scaleDown": {"stabilizationWindow": "0s"}}),
    );
    tq["spec"]["worker"]["concurrency"] = json!(1);
    tq["spec"]["worker"]["prefetchMultiplier"] = json!(1);
    create_taskqueue(&client, &ns, tq).await;
    let operator = Operator::start(&client, &ns);
    wait_replicas(&client, &ns, "ai", 3).await;

    // The controller-manager creates the pods; with no kubelet here they stay Pending, so real
    // Celery workers run locally under the pods' names (`-n ai-worker@<pod>`, as %h would be).
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let selector = "app.kubernetes.io/instance=ai";
    let names = wait_for("3 worker pods", T, || async {
        let list = pods.list(&kube::api::ListParams::default().labels(selector)).await.unwrap();
        let mut names: Vec<String> = list.items.iter().filter_map(|p| p.metadata.name.clone()).collect();
        names.sort();
        (names.len() == 3).then_some(names)
    })
    .await;
    // Record every pod's last deletion cost, including the pods the scale-in deletes.
    let costs = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<String, String>::new()));
    let recorder = tokio::spawn({
        let (costs, pods) = (costs.clone(), pods.clone());
        async move {
            let mut events = std::pin::pin!(watcher(pods, watcher::Config::default().labels(selector)));
            while let Some(Ok(ev)) = events.next().await {
                if let watcher::Event::Apply(p) | watcher::Event::Delete(p) | watcher::Event::InitApply(p) = ev {
                    if let Some(c) = p.metadata.annotations.as_ref().and_then(|a| a.get(DELETION_COST)) {
                        costs.lock().unwrap().insert(p.metadata.name.clone().unwrap(), c.clone());
                    }
                }
            }
        }
    });
    let d = deployment(&client, &ns, "ai").await.unwrap();
    let as_pod = |pod: &str| command(&d).iter().map(|a| a.replace("%h", pod)).collect::<Vec<_>>();
    // The first worker takes one long task (about 200 s) and is busy; the other two stay idle.
    // Celery acks on start by default, so the running task is in no Redis key: only the
    // worker's heartbeat (`active`) tells that this pod is busy.
    let busy = Worker::start_scaled(&redis.url(), &as_pod(&names[0]), "20");
    celery(&redis.url(), &["send", "app.worker.tasks.ai_tasks.run_ai_text_generation", "1"]);
    wait_for("the busy worker to take the task", T, || async {
        (kombu_count(&redis.url(), "ai_processing") == 0).then_some(())
    })
    .await;
    let idle = [Worker::start(&redis.url(), &as_pod(&names[1])), Worker::start(&redis.url(), &as_pod(&names[2]))];
    tokio::time::sleep(Duration::from_secs(5)).await; // a few heartbeats (every 2 s)

    // Allow scale-in to 1 (nothing waits in Redis, so demand is 0 and minReplicas decides).
    let api: Api<TaskQueue> = Api::namespaced(client.clone(), &ns);
    let patch = kube::api::Patch::Merge(json!({"spec": {"scaling": {"minReplicas": 1}}}));
    api.patch("ai", &Default::default(), &patch).await.unwrap();
    wait_replicas(&client, &ns, "ai", 1).await;
    wait_for("deletion costs of all 3 pods seen", T, || async { (costs.lock().unwrap().len() == 3).then_some(()) })
        .await;
    let seen = costs.lock().unwrap().clone();
    assert_eq!(seen[&names[0]], "1", "the busy worker costs its running task: {seen:?}");
    assert_eq!(seen[&names[1]], "0", "idle: {seen:?}");
    assert_eq!(seen[&names[2]], "0", "idle: {seen:?}");

    recorder.abort();
    drop((busy, idle));
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn a_wrong_password_is_an_auth_failure_that_leaks_no_secret_and_fallback_applies() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "auth").await;
    let redis = Redis::start().await;
    let mut admin = support::redis_conn(&redis.url()).await;
    let _: () =
        redis::cmd("CONFIG").arg(&["SET", "requirepass", "right-pw"][..]).query_async(&mut admin).await.unwrap();
    let wrong = format!("redis://:hunter2-wrong@127.0.0.1:{}/0", redis.port);
    broker_secret(&client, &ns, &wrong).await;
    let scaling = json!({"maxReplicas": 5, "pollInterval": "500ms", "fallbackReplicas": 2, "fallbackAfter": "3s", "scaleDown": {"stabilizationWindow": "1s"}});
    create_taskqueue(&client, &ns, pool("ai", "ai_processing", scaling)).await;
    // The real binary, so its log output can be checked too.
    let log = std::env::temp_dir().join(format!("tq-auth-{}.log", free_port()));
    let metrics_port = free_port();
    let _operator = ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_taskqueue-operator"))
            .args(["run", "--namespace", &ns, "--broker-timeout", "1s", "--leader-election=false"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env("RUST_LOG", "debug,kube=info,hyper=info,tower=info")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );

    let t = wait_for("BrokerReachable=False", T, || async {
        Some(taskqueue(&client, &ns, "ai").await)
            .filter(|t| condition(t, "BrokerReachable").is_some_and(|c| c.0 == "False"))
    })
    .await;
    let (_, reason, message) = condition(&t, "BrokerReachable").unwrap();
    assert_eq!(reason, "BrokerAuthFailed", "{message}");
    assert!(message.contains("check the user and password"), "{message}");
    // fallbackAfter 3 s: the pool gets its fallback replicas, with the reason in the event.
    wait_replicas(&client, &ns, "ai", 2).await;
    let up = wait_for("the ScaledUp event", T, || async {
        Some(events(&client, &ns, "ai", "ScaledUp").await).filter(|e| !e.is_empty())
    })
    .await;
    assert_eq!(up.len(), 1);
    let note = up[0].note.clone().unwrap();
    assert!(note.contains("fallbackReplicas 2"), "{note}");
    assert_eq!(events(&client, &ns, "ai", "BrokerAuthFailed").await.len(), 1, "one event per transition");
    // The same story on /metrics.
    assert_eq!(http_get(metrics_port, "/readyz").0, 200);
    let series = format!("{{namespace=\"{ns}\",name=\"ai\"}}");
    let metrics = wait_for("desired_replicas 2 on /metrics", T, || async {
        Some(http_get(metrics_port, "/metrics").1)
            .filter(|m| m.contains(&format!("taskqueue_desired_replicas{series} 2")))
    })
    .await;
    assert!(metrics.contains(&format!("taskqueue_broker_up{series} 0")), "{metrics}");
    assert!(metric(&metrics, "taskqueue_broker_reads_total{result=\"BrokerAuthFailed\"}") >= 1.0, "{metrics}");

    // The password is nowhere: status, events, logs.
    let t = taskqueue(&client, &ns, "ai").await;
    let status = serde_json::to_string(&t.status).unwrap();
    let all_events = serde_json::to_string(&events(&client, &ns, "ai", "BrokerAuthFailed").await).unwrap();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("BrokerAuthFailed"), "the failure is logged");
    for (what, text) in [("status", &status), ("events", &all_events), ("logs", &logs)] {
        assert!(!text.contains("hunter2-wrong"), "password in {what}: {text}");
    }

    // The broker accepts that password now (rotation): normal scaling resumes, back to 0.
    let _: () =
        redis::cmd("CONFIG").arg(&["SET", "requirepass", "hunter2-wrong"][..]).query_async(&mut admin).await.unwrap();
    wait_replicas(&client, &ns, "ai", 0).await;
    wait_condition(&client, &ns, "ai", "BrokerReachable", "True").await;
    // Settled: the broker is read every 500 ms, and no API write follows.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = http_get(metrics_port, "/metrics").1;
    assert!(before.contains(&format!("taskqueue_broker_up{series} 1")), "{before}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = http_get(metrics_port, "/metrics").1;
    assert!(api_writes(&before) > 0.0, "the writes before are counted: {before}");
    assert_eq!(api_writes(&before), api_writes(&after), "no API writes in a steady state:\n{before}\n{after}");
    let ok = "taskqueue_broker_reads_total{result=\"ok\"}";
    assert!(metric(&after, ok) >= metric(&before, ok) + 5.0, "reads go on: {after}");
    let _ = std::fs::remove_file(&log);
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn a_sentinel_broker_url_with_master_name_scales_like_a_plain_one() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "sentinel").await;
    let redis = Redis::start().await;
    let sentinel = Sentinel::start("mymaster", redis.port, None).await;
    // Several sentinels, the first one down: it is skipped.
    let url = format!("sentinel://127.0.0.1:{};sentinel://127.0.0.1:{}/0", free_port(), sentinel.port);
    broker_secret(&client, &ns, &url).await;
    let mut tq = pool("ai", "ai_processing", json!({"maxReplicas": 10, "pollInterval": "500ms"}));
    tq["spec"]["broker"]["transportOptions"] = json!({"masterName": "mymaster"});
    create_taskqueue(&client, &ns, tq).await;
    let operator = Operator::start(&client, &ns);
    wait_replicas(&client, &ns, "ai", 0).await;

    // A real Celery producer on the same Sentinel URL (kombu's master_name transport option).
    let out = python(&url)
        .env("CELERY_BROKER_MASTER_NAME", "mymaster")
        .arg(repo().join("deploy/demo/produce.py"))
        .args(["send", "app.worker.tasks.ai_tasks.run_ai_text_generation", "8"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(kombu_count(&redis.url(), "ai_processing"), 8, "the messages went to the master behind the sentinel");
    wait_replicas(&client, &ns, "ai", 2).await;
    let t = wait_for("status.pending 8", T, || async {
        Some(taskqueue(&client, &ns, "ai").await).filter(|t| t.status.as_ref().and_then(|s| s.pending) == Some(8))
    })
    .await;
    let (status, _, message) = condition(&t, "BrokerReachable").unwrap();
    assert_eq!(status, "True");
    assert!(message.contains("(master mymaster)"), "{message}");

    // A master name the sentinels do not know: the condition names the field to fix.
    let api: Api<TaskQueue> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"spec": {"broker": {"transportOptions": {"masterName": "other"}}}});
    api.patch("ai", &Default::default(), &kube::api::Patch::Merge(patch)).await.unwrap();
    let t = wait_for("BrokerReachable=False", T, || async {
        Some(taskqueue(&client, &ns, "ai").await)
            .filter(|t| condition(t, "BrokerReachable").is_some_and(|c| c.0 == "False"))
    })
    .await;
    let (_, _, message) = condition(&t, "BrokerReachable").unwrap();
    assert!(message.contains("spec.broker.transportOptions.masterName"), "{message}");
    assert_eq!(replicas(&deployment(&client, &ns, "ai").await.unwrap()), 2, "frozen while unreadable");

    operator.stop().await;
    delete_namespace(&client, &ns).await;
}
