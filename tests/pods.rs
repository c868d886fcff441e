//! Worker pods that run: the lab's node (deploy/local/node.sh: kubelet, containerd, runc) starts
//! the worker Deployments the operator writes, from the Celery image built without a registry
//! (deploy/local/images.sh). Marked `#[ignore]`: `make test` runs them inside the lab.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::Api;
use serde_json::json;
use support::*;

const T: Duration = Duration::from_secs(180);

/// A TaskQueue whose workers run here: the lab's worker image, the toleration the lab's node
/// asks for, and each task recording its id and worker in the broker hash `done`.
fn real_pool(name: &str, queue: &str, scaling: serde_json::Value) -> serde_json::Value {
    let mut tq = pool(name, queue, scaling);
    tq["spec"]["worker"] = json!({
        "image": WORKER_IMAGE, "app": "app.worker", "concurrency": 2, "prefetchMultiplier": 1,
        "env": [{"name": "TASK_RECORD_KEY", "value": "done"}],
        "podTemplate": {"spec": {"tolerations": [Lab::toleration()]}}
    });
    tq
}

/// What each test here starts from: the lab's node (or a skip, counted by `make test`), a
/// namespace, and a Redis the pods reach, named in the namespace's broker Secret.
async fn setup(test: &str, prefix: &str) -> Option<(Lab, kube::Client, String, Redis)> {
    let Some(lab) = Lab::from_env() else {
        skipped(test, "no lab node (TQ_LAB_NET unset): run it with `make test`");
        return None;
    };
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, prefix).await;
    let redis = Redis::start_for_pods(&lab).await;
    broker_secret(&client, &ns, &redis.url_for_pods()).await;
    Some((lab, client, ns, redis))
}

async fn ready_pods(client: &kube::Client, ns: &str, name: &str) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={name}"));
    pods.list(&lp)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|p| p.metadata.name)
        .collect()
}

async fn hlen(url: &str, key: &str) -> i64 {
    let mut c = redis_conn(url).await;
    redis::cmd("HLEN").arg(key).query_async(&mut c).await.unwrap()
}

#[tokio::test]
#[ignore = "needs the lab's node: make test"]
async fn real_worker_pods_take_the_work_and_the_pool_returns_to_its_minimum() {
    let Some((_, client, ns, redis)) =
        setup("real_worker_pods_take_the_work_and_the_pool_returns_to_its_minimum", "pods").await
    else {
        return;
    };
    let operator = Operator::start(&client, &ns);
    let scaling = json!({"minReplicas": 1, "maxReplicas": 3, "tasksPerReplica": 4, "pollInterval": "1s",
                         "scaleDown": {"stabilizationWindow": "5s"}});
    create_taskqueue(&client, &ns, real_pool("work", "podq", scaling)).await;

    // Ready because a worker pod is: nothing here patches a status.
    let tq = wait_for("Ready=True from one running worker pod", T, || async {
        let tq = taskqueue(&client, &ns, "work").await;
        (condition(&tq, "Ready").map(|c| c.0).as_deref() == Some("True")).then_some(tq)
    })
    .await;
    let (_, reason, message) = condition(&tq, "Ready").unwrap();
    assert_eq!((reason.as_str(), message.as_str()), ("WorkersReady", "1/1 worker pods ready"));
    assert_eq!(ready_pods(&client, &ns, "work").await.len(), 1);

    // 24 one-second tasks: ceil(24 / 4) = 6, held at maxReplicas 3; all three pods start and work.
    celery(&redis.url(), &["ids", "podq", "24", "pod-"]);
    wait_replicas(&client, &ns, "work", 3).await;
    let three = wait_for("3 worker pods Ready", T, || async {
        let pods = ready_pods(&client, &ns, "work").await;
        (pods.len() == 3).then_some(pods)
    })
    .await;
    wait_for("all 24 tasks run", T, || async { (hlen(&redis.url(), "done").await == 24).then_some(()) }).await;

    // Every task ran once, on one of the pods (Celery's hostname is `<nodeName>@<pod>`).
    let mut c = redis_conn(&redis.url()).await;
    let ran: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg("done").query_async(&mut c).await.unwrap();
    for i in 0..24 {
        let host = ran.get(&format!("pod-{i}")).unwrap_or_else(|| panic!("task pod-{i} did not run: {ran:?}"));
        let pod = host.split_once('@').map(|h| h.1).unwrap_or_default();
        assert!(three.iter().any(|p| p == pod) || pod.starts_with("work-"), "pod-{i} ran on {host}");
    }
    let pods_used: std::collections::BTreeSet<&str> = ran.values().map(String::as_str).collect();
    println!("24 tasks ran on {} pods: {pods_used:?}", pods_used.len());

    // Drained: back to minReplicas after the 5 s window, and the removed pods are gone.
    wait_replicas(&client, &ns, "work", 1).await;
    wait_for("1 worker pod left", T, || async { (ready_pods(&client, &ns, "work").await.len() == 1).then_some(()) })
        .await;
    let mut c = redis_conn(&redis.url()).await;
    let (pending, unacked): (i64, i64) =
        redis::pipe().cmd("LLEN").arg("podq").cmd("HLEN").arg("unacked").query_async(&mut c).await.unwrap();
    assert_eq!((pending, unacked), (0, 0), "nothing left in the broker");
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

/// The API server's port, from the kubeconfig the tests use (pods dial the lab's bridge address:
/// there is no kube-proxy behind the `kubernetes` Service's ClusterIP, and nothing may dial it).
fn api_port() -> String {
    let kubeconfig = std::fs::read_to_string(std::env::var("KUBECONFIG").expect("KUBECONFIG")).unwrap();
    let server = kubeconfig.lines().find_map(|l| l.split("server: \"https://").nth(1)).expect("server in KUBECONFIG");
    server.split(['"', '/']).next().unwrap().rsplit(':').next().unwrap().to_string()
}

async fn lease_holder(client: &kube::Client, ns: &str) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), ns);
    leases.get_opt("taskqueue-operator").await.ok().flatten()?.spec?.holder_identity
}

async fn operator_pods(client: &kube::Client, ns: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.list(&ListParams::default().labels("app.kubernetes.io/name=taskqueue-operator")).await.unwrap().items
}

fn is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::test]
#[ignore = "needs the lab's node: make test"]
async fn the_chart_runs_the_operator_in_the_cluster_and_a_killed_leader_is_replaced() {
    let test = "the_chart_runs_the_operator_in_the_cluster_and_a_killed_leader_is_replaced";
    let Some((lab, client, work, redis)) = setup(test, "incluster-work").await else { return };
    let ops = namespace(&client, "incluster-ops").await;

    // The chart as a user installs it, with the lab's image; the two lab-specific values: the
    // toleration of the lab's node, and the API server's real address (no kube-proxy here).
    let (repository, tag) = OPERATOR_IMAGE.rsplit_once(':').unwrap();
    let chart = repo().join("charts/taskqueue-operator");
    let sets = [
        format!("image.repository={repository}"),
        format!("image.tag={tag}"),
        format!("watchNamespace={work}"),
        format!("tolerations[0].key={REAL_PODS_TAINT}"),
        "tolerations[0].operator=Exists".to_string(),
        "tolerations[0].effect=NoSchedule".to_string(),
        "extraEnv[0].name=KUBERNETES_SERVICE_HOST".to_string(),
        format!("extraEnv[0].value={}", lab.gateway()),
        "extraEnv[1].name=KUBERNETES_SERVICE_PORT".to_string(),
        format!("extraEnv[1].value={}", api_port()),
    ];
    let mut args = vec!["install", "tqo", chart.to_str().unwrap(), "--namespace", ops.as_str()];
    for s in &sets {
        // --set-string: a port must stay a string in an EnvVar.
        args.extend([if s.starts_with("extraEnv") { "--set-string" } else { "--set" }, s.as_str()]);
    }
    run("helm", &args);

    // Two pods Ready (their /readyz passes), one leader named in the Lease.
    let pods = wait_for("2 operator pods Ready", T, || async {
        let ready: Vec<Pod> = operator_pods(&client, &ops).await.into_iter().filter(is_ready).collect();
        (ready.len() == 2).then_some(ready)
    })
    .await;
    let names: Vec<String> = pods.iter().filter_map(|p| p.metadata.name.clone()).collect();
    let leader = wait_for("the Lease to name an operator pod", T, || async {
        lease_holder(&client, &ops).await.filter(|h| names.contains(h))
    })
    .await;
    // As the chart asks: non-root (the image's user, 65532), read-only root filesystem, and the
    // ServiceAccount token Kubernetes mounts (no kubeconfig in the image or the pod).
    let pod = pods.iter().find(|p| p.metadata.name.as_deref() == Some(&leader)).unwrap();
    let spec = pod.spec.as_ref().unwrap();
    let c = &spec.containers[0];
    assert_eq!(c.security_context.as_ref().and_then(|s| s.read_only_root_filesystem), Some(true));
    assert!(c.env.iter().flatten().all(|e| e.name != "KUBECONFIG"), "no kubeconfig");
    assert!(c.volume_mounts.iter().flatten().any(|m| m.mount_path == "/var/run/secrets/kubernetes.io/serviceaccount"));
    let uid = run("kubectl", &["exec", "-n", &ops, &leader, "--", "id", "-u"]);
    assert_eq!(uid.trim(), "65532");
    let write = std::process::Command::new("kubectl")
        .args(["exec", "-n", &ops, &leader, "--", "touch", "/x"])
        .output()
        .unwrap();
    assert!(!write.status.success(), "the root filesystem is read-only");

    // The in-cluster leader scales a pool of real workers from the broker.
    create_taskqueue(
        &client,
        &work,
        real_pool(
            "work",
            "clusterq",
            json!({"minReplicas": 0, "maxReplicas": 2, "pollInterval": "1s", "tasksPerReplica": 4}),
        ),
    )
    .await;
    celery(&redis.url(), &["ids", "clusterq", "8", "c-"]);
    wait_replicas(&client, &work, "work", 2).await;
    wait_for("8 tasks run by worker pods", T, || async { (hlen(&redis.url(), "done").await == 8).then_some(()) }).await;

    // Delete the leader pod: the leadership moves to another live pod (the warm standby, or the
    // replacement if it asks first: both are a takeover), and a replacement starts.
    run("kubectl", &["delete", "pod", "-n", &ops, &leader, "--grace-period=0", "--force", "--wait=false"]);
    let new_leader = wait_for("another live operator pod to hold the Lease", T, || async {
        let holder = lease_holder(&client, &ops).await.filter(|h| *h != leader)?;
        let live = operator_pods(&client, &ops).await;
        live.iter().any(|p| p.metadata.name.as_deref() == Some(holder.as_str())).then_some(holder)
    })
    .await;
    let standby = names.iter().find(|n| **n != leader).unwrap();
    println!(
        "leader {leader} deleted; the Lease went to {} ({new_leader})",
        if new_leader == *standby { "the standby" } else { "the replacement" }
    );
    wait_for("a replacement operator pod Ready", T, || async {
        let ready: Vec<String> = operator_pods(&client, &ops)
            .await
            .iter()
            .filter(|p| is_ready(p))
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        (ready.len() == 2 && !ready.contains(&leader)).then_some(())
    })
    .await;
    // And the new leader reconciles: a new pool gets its Deployment and a worker for its work.
    create_taskqueue(
        &client,
        &work,
        real_pool(
            "after",
            "afterq",
            json!({"minReplicas": 0, "maxReplicas": 2, "pollInterval": "1s", "tasksPerReplica": 4}),
        ),
    )
    .await;
    celery(&redis.url(), &["ids", "afterq", "4", "d-"]);
    wait_replicas(&client, &work, "after", 1).await;
    wait_for("4 more tasks run under the new leader", T, || async {
        (hlen(&redis.url(), "done").await == 12).then_some(())
    })
    .await;
    run("helm", &["uninstall", "tqo", "--namespace", &ops]);
    delete_namespace(&client, &work).await;
    delete_namespace(&client, &ops).await;
}

/// Scale-in with work running (the README's claim, observed): pods removed while each runs a
/// task shorter than the grace period get SIGTERM as Celery's PID 1, finish the task (warm
/// shutdown) and exit; nothing is lost. Before the scale-in the operator has put each pod's
/// `pod-deletion-cost` from its worker's heartbeat, matched by the real pod name. (The 1.20
/// controller-manager here ignores that annotation: which pod goes first is not tested.)
#[tokio::test]
#[ignore = "needs the lab's node: make test"]
async fn pods_scaled_in_while_running_a_task_finish_it_and_lose_nothing() {
    let Some((_, client, ns, redis)) =
        setup("pods_scaled_in_while_running_a_task_finish_it_and_lose_nothing", "scalein").await
    else {
        return;
    };
    let operator = Operator::start(&client, &ns);
    // One task per pod (concurrency 1, prefetch 1, acks late) of 15 s, in-flight work not counted: once both
    // pods hold their task the pool's demand is 0 and it scales in after a 6 s window, long
    // enough for each worker's heartbeat (every 2 s) to report its running task.
    let mut tq = real_pool(
        "busy",
        "busyq",
        json!({"minReplicas": 0, "maxReplicas": 2, "tasksPerReplica": 1, "countInFlight": false,
               "pollInterval": "1s", "scaleDown": {"stabilizationWindow": "6s"}}),
    );
    tq["spec"]["worker"]["concurrency"] = json!(1);
    // acks_late: a worker (prefetch 1) then holds one task, not one running and one reserved.
    tq["spec"]["worker"]["env"] = json!([
        {"name": "TASK_RECORD_KEY", "value": "done"}, {"name": "TASK_SCALE", "value": "15"},
        {"name": "CELERY_ACKS_LATE", "value": "1"}
    ]);
    create_taskqueue(&client, &ns, tq).await;
    celery(&redis.url(), &["ids", "busyq", "2", "busy-"]);
    wait_replicas(&client, &ns, "busy", 2).await;

    // Watch the pods until the scale-in: their deletion costs as the operator set them.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let lp = ListParams::default().labels("app.kubernetes.io/instance=busy");
    let mut costs = std::collections::BTreeMap::new();
    let started = std::time::Instant::now();
    let scaled_in = loop {
        assert!(started.elapsed() < T, "no scale-in within {T:?}; costs seen: {costs:?}");
        // The Deployment first: its pods, terminating, still show the costs set before it.
        let done = deployment(&client, &ns, "busy").await.is_some_and(|d| replicas(&d) < 2);
        for p in pods.list(&lp).await.unwrap().items {
            let cost =
                p.metadata.annotations.as_ref().and_then(|a| a.get("controller.kubernetes.io/pod-deletion-cost"));
            if let (Some(name), Some(cost)) = (p.metadata.name.clone(), cost) {
                costs.insert(name, cost.clone());
            }
        }
        if done {
            break std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("deletion costs before the scale-in: {costs:?}");
    assert!(
        costs.len() == 2 && costs.values().all(|c| c == "1"),
        "each busy pod's cost is its 1 running task, matched by its real name: {costs:?}"
    );
    // The scale-in came while both tasks ran; they finish (one in its pod's warm shutdown), the
    // pool goes to 0 and the pods go.
    assert_eq!(hlen(&redis.url(), "done").await, 0, "both tasks were still running at the scale-in");
    wait_for("both tasks recorded", T, || async { (hlen(&redis.url(), "done").await == 2).then_some(()) }).await;
    let finished = scaled_in.elapsed();
    wait_replicas(&client, &ns, "busy", 0).await;
    wait_for("the pods gone", T, || async { pods.list(&lp).await.ok().filter(|l| l.items.is_empty()).map(|_| ()) })
        .await;
    let mut c = redis_conn(&redis.url()).await;
    let (pending, unacked): (i64, i64) =
        redis::pipe().cmd("LLEN").arg("busyq").cmd("HLEN").arg("unacked").query_async(&mut c).await.unwrap();
    assert_eq!((pending, unacked), (0, 0), "nothing left or redelivered");
    println!("both tasks finished {:.1} s after the first scale-in step", finished.as_secs_f64());
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}
