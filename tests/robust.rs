//! The unhappy path, end to end on the real stack (kube-apiserver + controller-manager,
//! redis-server): hand edits are repaired, a Deployment the API server refuses is reported, a
//! ConfigMap someone else owns is never taken over, a rotated broker password is followed, and
//! a blackholed broker does not slow a healthy one down. Marked `#[ignore]`: `make test` runs them.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;
use support::*;

async fn del(url: &str, key: &str) {
    let mut c = support::redis_conn(url).await;
    let _: () = redis::cmd("DEL").arg(key).query_async(&mut c).await.unwrap();
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn hand_edits_of_managed_fields_are_restored_within_one_reconcile() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "drift").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    let scaling = json!({"minReplicas": 1, "pollInterval": "500ms"});
    create_taskqueue(&client, &ns, pool("ai", "ai_processing", scaling)).await;
    let operator = Operator::start(&client, &ns);
    let original = wait_for("Deployment", T, || deployment(&client, &ns, "ai")).await;
    wait_condition(&client, &ns, "ai", "Ready", "False").await;

    // What `kubectl edit` / `kubectl scale` would do: another field manager changes our fields.
    let edit = json!({"spec": {"replicas": 7, "template": {"spec": {"containers": [{
        "name": "worker", "image": "evil/image:1", "args": ["--pool=solo"],
        "env": [{"name": "CELERY_BROKER_URL", "value": "redis://elsewhere:6379/0", "valueFrom": null}]
    }]}}}});
    let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let by_hand = PatchParams { field_manager: Some("kubectl-edit".into()), ..PatchParams::default() };
    api.patch("ai", &by_hand, &Patch::Strategic(&edit)).await.unwrap();

    let restored = wait_for("the hand edits restored", T, || async {
        let d = deployment(&client, &ns, "ai").await?;
        let c = &d.spec.as_ref()?.template.spec.as_ref()?.containers[0];
        let env_ok = c.env.as_ref()?.iter().any(|e| e.name == "CELERY_BROKER_URL" && e.value_from.is_some());
        let fixed = replicas(&d) == 1
            && c.image.as_deref() == Some("example/celery-app:1.0")
            && c.args.as_ref().is_none_or(Vec::is_empty)
            && env_ok;
        fixed.then_some(d)
    })
    .await;
    assert_eq!(command(&restored), command(&original));
    let restored_events = wait_for("a Restored event", T, || async {
        Some(events(&client, &ns, "ai", "Restored").await).filter(|e| !e.is_empty())
    })
    .await;
    let note = restored_events[0].note.clone().unwrap_or_default();
    assert!(note.contains("changed outside the operator"), "{note}");

    // And then it stays put: no write loop over what the server itself adds.
    let generation = deployment(&client, &ns, "ai").await.unwrap().metadata.generation;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(deployment(&client, &ns, "ai").await.unwrap().metadata.generation, generation, "no further writes");
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn a_deployment_the_api_server_refuses_is_reported_while_neighbours_scale() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "refused").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    // A volume name the API server refuses (not a DNS label): only the server knows all its rules.
    let mut refused = pool("refused", "refused", json!({"pollInterval": "500ms"}));
    refused["spec"]["worker"]["podTemplate"] = json!({"spec": {"volumes": [{"name": "Not_A_Label", "emptyDir": {}}]}});
    create_taskqueue(&client, &ns, refused).await;
    create_taskqueue(&client, &ns, pool("fine", "fine", json!({"pollInterval": "500ms"}))).await;
    let operator = Operator::start(&client, &ns);

    let message = wait_for("Ready=False DeploymentRejected", T, || async {
        let t = taskqueue(&client, &ns, "refused").await;
        condition(&t, "Ready").filter(|c| c.1 == "DeploymentRejected").map(|c| c.2)
    })
    .await;
    assert!(message.contains("Not_A_Label") && message.contains("the API server refused"), "{message}");
    // The neighbour scales meanwhile.
    lpush(&redis.url(), "fine", 5).await;
    wait_replicas(&client, &ns, "fine", 2).await;
    assert!(deployment(&client, &ns, "refused").await.is_none(), "nothing was created");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let warned = events(&client, &ns, "refused", "DeploymentRejected").await;
    assert_eq!(warned.len(), 1, "one Warning event, not one per reconcile");

    // Fixed spec: the Deployment appears and Ready follows the workers.
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &kube::api::ApiResource::erase::<taskqueue_operator::crd::TaskQueue>(&()),
    );
    let fix =
        json!({"spec": {"worker": {"podTemplate": {"spec": {"volumes": [{"name": "scratch", "emptyDir": {}}]}}}}});
    api.patch("refused", &PatchParams::default(), &Patch::Merge(&fix)).await.unwrap();
    wait_for("the fixed Deployment", T, || deployment(&client, &ns, "refused")).await;
    wait_for("Ready no longer DeploymentRejected", T, || async {
        let t = taskqueue(&client, &ns, "refused").await;
        condition(&t, "Ready").filter(|c| c.1 != "DeploymentRejected").map(|_| ())
    })
    .await;
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn a_routes_configmap_someone_else_created_is_never_taken_over() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "cmconflict").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let theirs: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "celery-task-routes"}, "data": {"task_routes.json": "their own content"}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &theirs).await.unwrap();
    let mut tq = pool("ai", "ai_processing", json!({"pollInterval": "500ms"}));
    tq["spec"]["routes"] = json!([{"pattern": "app.ai.*"}]);
    create_taskqueue(&client, &ns, tq).await;
    let operator = Operator::start(&client, &ns);

    let (_, message) = wait_condition(&client, &ns, "ai", "RoutesAccepted", "False").await;
    assert!(message.contains("was not created by taskqueue-operator"), "{message}");
    let t = taskqueue(&client, &ns, "ai").await;
    assert_eq!(condition(&t, "RoutesAccepted").unwrap().1, "ConfigMapConflict");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cm = cms.get("celery-task-routes").await.unwrap();
    assert_eq!(cm.data.unwrap()["task_routes.json"], "their own content", "their ConfigMap is untouched");
    assert_eq!(events(&client, &ns, "ai", "ConfigMapConflict").await.len(), 1);

    // Once theirs is gone, the table is published (the publisher looks again with backoff).
    cms.delete("celery-task-routes", &DeleteParams::default()).await.unwrap();
    wait_condition(&client, &ns, "ai", "RoutesAccepted", "True").await;
    let table = routes_configmap(&client, &ns).await.unwrap();
    assert!(table.contains("app.ai.*"), "{table}");
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn a_routing_table_above_one_mebibyte_is_cut_into_configmaps_that_celery_loads_in_order() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "bigroutes").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    // 20 TaskQueues x 250 globs (the CRD's most per TaskQueue) of ~230 characters: ~1.3 MB of
    // table. The last entry (the least specific glob) routes the demo app's page_oncall to bigq19.
    let filler = "x".repeat(200);
    for i in 0..20 {
        let mut routes: Vec<serde_json::Value> =
            (0..250).map(|j| json!({"pattern": format!("app.tasks.t{i:02}.{j:03}.{filler}.*")})).collect();
        if i == 19 {
            routes.push(json!({"pattern": "app.worker.tasks.urgent.page_onc*"}));
        }
        let mut tq = pool(&format!("big{i}"), &format!("bigq{i}"), json!({"pollInterval": "1s"}));
        tq["spec"]["routes"] = json!(routes);
        create_taskqueue(&client, &ns, tq).await;
    }
    let operator = Operator::start(&client, &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let part2 = wait_for("ConfigMap celery-task-routes-part002", T, || async {
        cms.get_opt("celery-task-routes-part002").await.unwrap()
    })
    .await;
    let part1 = cms.get("celery-task-routes").await.unwrap();
    let (one, two) =
        (&part1.data.as_ref().unwrap()["task_routes.json"], &part2.data.as_ref().unwrap()["task_routes.json.part002"]);
    assert!(one.len() <= 1_000_000 && two.len() <= 1_000_000, "{} + {} bytes", one.len(), two.len());
    assert_eq!(part1.metadata.owner_references.as_ref().map(Vec::len), Some(5), "owners: at most the 5 oldest");
    assert!(cms.get_opt("celery-task-routes-part003").await.unwrap().is_none());
    let message = wait_for("big0: RoutesAccepted names both parts", T, || async {
        let c = condition(&taskqueue(&client, &ns, "big0").await, "RoutesAccepted")?;
        (c.0 == "True" && c.2.contains("cut into 2 parts")).then_some(c.2)
    })
    .await;
    assert!(message.contains("ConfigMaps celery-task-routes, celery-task-routes-part002;"), "{message}");

    // The two parts, mounted side by side, are the whole table for the real Celery app: the task
    // the last entry routes goes to bigq19. With the first part alone it would go to `celery`.
    let dir = std::env::temp_dir().join(format!("{ns}-routes"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("task_routes.json"), one).unwrap();
    celery_routed(
        &redis.url(),
        Some(&dir.join("task_routes.json")),
        &["send", "app.worker.tasks.urgent.page_oncall", "1"],
    );
    assert_eq!((kombu_count(&redis.url(), "bigq19"), kombu_count(&redis.url(), "celery")), (0, 1), "first part alone");
    std::fs::write(dir.join("task_routes.json.part002"), two).unwrap();
    celery_routed(
        &redis.url(),
        Some(&dir.join("task_routes.json")),
        &["send", "app.worker.tasks.urgent.page_oncall", "1"],
    );
    assert_eq!(kombu_count(&redis.url(), "bigq19"), 1, "both parts: routed by the table's last entry");
    let _ = std::fs::remove_dir_all(&dir);

    // Back under 1 MiB: one ConfigMap again, the left-over part deleted.
    for i in 1..20 {
        Api::<taskqueue_operator::crd::TaskQueue>::namespaced(client.clone(), &ns)
            .delete(&format!("big{i}"), &DeleteParams::default())
            .await
            .unwrap();
    }
    wait_for("part002 deleted", T, || async {
        cms.get_opt("celery-task-routes-part002").await.unwrap().is_none().then_some(())
    })
    .await;
    wait_for("big0: the table is in one ConfigMap again", T, || async {
        let c = condition(&taskqueue(&client, &ns, "big0").await, "RoutesAccepted")?;
        (c.0 == "True" && c.2 == "250 route(s) in ConfigMap celery-task-routes").then_some(())
    })
    .await;
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn a_rotated_broker_password_is_used_within_a_poll_of_the_old_one_failing() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "rotate").await;
    let redis = Redis::start().await;
    let mut admin = support::redis_conn(&redis.url()).await;
    let set_pw = |pw: &'static str| redis::cmd("CONFIG").arg(&["SET", "requirepass", pw][..]).clone();
    let _: () = set_pw("old-pw").query_async(&mut admin).await.unwrap();
    let url = |pw: &str| format!("redis://:{pw}@127.0.0.1:{}/0", redis.port);
    broker_secret(&client, &ns, &url("old-pw")).await;
    create_taskqueue(&client, &ns, pool("ai", "ai_processing", json!({"pollInterval": "500ms"}))).await;
    // A Secret cache of an hour: only the re-read after a failure can pick up the new password.
    let operator = Operator::start_with(&client, &ns, |s| s.secret_ttl = Duration::from_secs(3600));
    wait_condition(&client, &ns, "ai", "BrokerReachable", "True").await;

    // Rotation: the Secret gets the new password, then Redis drops the old one.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"stringData": {"url": url("new-pw")}});
    secrets.patch("celery-broker", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let _: () = set_pw("new-pw").query_async(&mut admin).await.unwrap();
    // `requirepass` applies to new logins only: drop the operator's authenticated connections,
    // so its next read logs in again, with the old password, and fails.
    let killed: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"][..])
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(killed >= 1, "the operator's connection was open");
    lpush(&url("new-pw"), "ai_processing", 8).await;
    wait_replicas(&client, &ns, "ai", 2).await;
    wait_condition(&client, &ns, "ai", "BrokerReachable", "True").await;
    assert!(
        events(&client, &ns, "ai", "BrokerAuthFailed").await.is_empty(),
        "the new password was used before any failure was reported"
    );
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

/// A loopback listener that accepts connections and never answers; it records when the operator
/// gives up on one (closes it).
struct Blackhole {
    port: u16,
    closed: Arc<Mutex<Vec<Instant>>>,
    accepted: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (closed, accepted) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let task = tokio::spawn({
            let (closed, accepted) = (closed.clone(), accepted.clone());
            async move {
                while let Ok((mut sock, _)) = listener.accept().await {
                    accepted.lock().unwrap().push(Instant::now());
                    let closed = closed.clone();
                    tokio::spawn(async move {
                        use tokio::io::AsyncReadExt;
                        let mut buf = [0u8; 4096];
                        while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
                        closed.lock().unwrap().push(Instant::now());
                    });
                }
            }
        });
        Blackhole { port, closed, accepted, task }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bursts on the healthy queue: the time from LPUSH to the Deployment asking for 2 replicas,
/// then back to 0 after the queue is emptied.
async fn bursts(client: &kube::Client, ns: &str, url: &str, rounds: usize) -> Vec<(Instant, Duration)> {
    let mut out = Vec::new();
    let mut phase: u64 = 7;
    for _ in 0..rounds {
        // Start each burst at another point of the poll cycle (pollInterval 1 s), as bursts come.
        phase = (phase * 1_103_515_245 + 12_345) % 1_000_003;
        tokio::time::sleep(Duration::from_millis(phase % 1000)).await;
        let t0 = Instant::now();
        lpush(url, "healthy", 8).await;
        // Polled every 10 ms (wait_for's 200 ms would round every figure up to it).
        while deployment(client, ns, "healthy").await.is_none_or(|d| replicas(&d) != 2) {
            assert!(t0.elapsed() < T, "burst -> 2 replicas within {T:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        out.push((Instant::now(), t0.elapsed()));
        del(url, "healthy").await;
        wait_replicas(client, ns, "healthy", 0).await;
    }
    out
}

fn median(v: &[(Instant, Duration)]) -> Duration {
    let mut d: Vec<Duration> = v.iter().map(|(_, d)| *d).collect();
    d.sort();
    d[d.len() / 2]
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn a_blackholed_broker_does_not_delay_a_healthy_one() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "isolation").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    let scaling = json!({"pollInterval": "1s", "scaleDown": {"stabilizationWindow": "0s"}});
    create_taskqueue(&client, &ns, pool("healthy", "healthy", scaling.clone())).await;
    // A broker deadline of 10 minutes: the blackhole's first read outlasts the whole test however
    // slow the machine, so "served while it hangs" is an order of events, not a race.
    const DEADLINE: Duration = Duration::from_secs(600);
    let operator = Operator::start_with(&client, &ns, |s| s.broker_timeout = DEADLINE);
    wait_condition(&client, &ns, "healthy", "BrokerReachable", "True").await;
    let alone = bursts(&client, &ns, &redis.url(), 7).await;

    // The neighbour: its own Secret, pointing at a listener that accepts and never answers.
    let hole = Blackhole::start().await;
    let s: Secret = serde_json::from_value(
        json!({"metadata": {"name": "blackhole"}, "stringData": {"url": format!("redis://127.0.0.1:{}/0", hole.port)}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &s).await.unwrap();
    let mut neighbour = pool("neighbour", "neighbour", scaling);
    neighbour["spec"]["broker"]["urlSecretRef"]["name"] = json!("blackhole");
    create_taskqueue(&client, &ns, neighbour).await;
    wait_for("the operator to dial the blackhole", T, || async {
        (!hole.accepted.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let beside = bursts(&client, &ns, &redis.url(), 7).await;

    // Every burst beside the blackhole was served while the blackhole's first read was still
    // waiting for its deadline: nothing the operator read from it had ended yet.
    let first_close = hole.closed.lock().unwrap().first().copied();
    let last_burst = beside.last().unwrap().0;
    assert!(
        first_close.is_none_or(|c| last_burst < c),
        "the healthy broker's bursts waited for the blackholed read to end"
    );
    let t = taskqueue(&client, &ns, "neighbour").await;
    assert_ne!(condition(&t, "BrokerReachable").map(|c| c.0).as_deref(), Some("True"));
    let ms =
        |v: &[(Instant, Duration)]| v.iter().map(|(_, d)| d.as_millis().to_string()).collect::<Vec<_>>().join(", ");
    let figures = format!(
        "Burst (8 messages) -> `spec.replicas` 2 on a healthy broker, `pollInterval: 1s`, 7 bursts at \
         spread points of the poll cycle; the neighbour's broker accepts connections and never answers \
         (broker deadline 600 s, so its first read hangs through all the bursts):\n\n\
         | | median | each burst (ms) |\n|---|---|---|\n\
         | alone | {} ms | {} |\n| beside the blackholed broker | {} ms | {} |\n\n\
         Every burst beside the blackhole was served while the operator's first read of the blackhole \
         was still waiting (asserted: no connection to it had been given up yet).\n",
        median(&alone).as_millis(),
        ms(&alone),
        median(&beside).as_millis(),
        ms(&beside)
    );
    println!("{figures}");
    support::docs::measured("docs/reliability.md", "isolation", &figures);
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}
