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
    let lab = match Lab::from_env() {
        Ok(lab) => lab,
        Err(why) => {
            skipped(test, &why);
            return None;
        }
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
    pods.list(&lp).await.unwrap().items.into_iter().filter(pod_ready).filter_map(|p| p.metadata.name).collect()
}

async fn hlen(url: &str, key: &str) -> i64 {
    let mut c = redis_conn(url).await;
    redis::cmd("HLEN").arg(key).query_async(&mut c).await.unwrap()
}

#[tokio::test]
#[ignore = "needs the lab's node: make test"]
async fn real_worker_pods_take_the_work_and_the_pool_returns_to_its_minimum() {
    let _node = NODE.read().await;
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
    leases.get_opt("tqo").await.ok().flatten()?.spec?.holder_identity
}

async fn operator_pods(client: &kube::Client, ns: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.list(&ListParams::default().labels("app.kubernetes.io/name=taskqueue-operator")).await.unwrap().items
}

/// The chart as a user installs it into `ops`, watching `work`, with the lab's image and the two
/// lab-specific values: the toleration of the lab's node, and the API server's real address (no
/// kube-proxy here). Returns once its two pods are Ready and the Lease names one of them: the
/// pods and the leader's name.
async fn install_operator(client: &kube::Client, lab: &Lab, ops: &str, work: &str) -> (Vec<Pod>, String) {
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
    let mut args = vec!["install", "tqo", chart.to_str().unwrap(), "--namespace", ops];
    for s in &sets {
        // --set-string: a port must stay a string in an EnvVar.
        args.extend([if s.starts_with("extraEnv") { "--set-string" } else { "--set" }, s.as_str()]);
    }
    run("helm", &args);

    // Two pods Ready (their /readyz passes), one leader named in the Lease.
    let pods = wait_for("2 operator pods Ready", T, || async {
        let ready: Vec<Pod> = operator_pods(client, ops).await.into_iter().filter(pod_ready).collect();
        (ready.len() == 2).then_some(ready)
    })
    .await;
    let names: Vec<String> = pods.iter().filter_map(|p| p.metadata.name.clone()).collect();
    let leader = wait_for("the Lease to name an operator pod", T, || async {
        lease_holder(client, ops).await.filter(|h| names.contains(h))
    })
    .await;
    (pods, leader)
}

#[tokio::test]
#[ignore = "needs the lab's node: make test"]
async fn the_chart_runs_the_operator_in_the_cluster_and_a_killed_leader_is_replaced() {
    let _node = NODE.read().await;
    let test = "the_chart_runs_the_operator_in_the_cluster_and_a_killed_leader_is_replaced";
    let Some((lab, client, work, redis)) = setup(test, "incluster-work").await else { return };
    let ops = namespace(&client, "incluster-ops").await;

    let (pods, leader) = install_operator(&client, &lab, &ops, &work).await;
    let names: Vec<String> = pods.iter().filter_map(|p| p.metadata.name.clone()).collect();
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

    // The metrics port serves Prometheus and the probes, not the page: that is on the pod's
    // loopback, reached through a port-forward (Kubernetes RBAC on pods/portforward).
    let ip = operator_pods(&client, &ops)
        .await
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some(leader.as_str()))
        .and_then(|p| p.status?.pod_ip)
        .expect("the leader pod's IP");
    let (status, body) = http_get_at(&ip, 8080, "/");
    assert!(status == 404 && body.contains("loopback"), "{status} {body}");
    assert_eq!(http_get_at(&ip, 8080, "/api/taskqueues").0, 404);
    let (status, body) = http_get_at(&ip, 8080, "/metrics");
    assert!(status == 200 && body.contains("taskqueue_leader 1"), "{status} {body}");
    let mut forward = std::process::Command::new("kubectl")
        .args(["port-forward", "-n", &ops, &format!("pod/{leader}"), "18081:8081"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let page = wait_for("the page through kubectl port-forward", Duration::from_secs(30), || async {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", 18081)).await.ok()?;
        drop(s);
        Some(http_get_at("127.0.0.1", 18081, "/api/taskqueues"))
    })
    .await;
    let _ = forward.kill();
    let _ = forward.wait();
    assert!(page.0 == 200 && page.1.contains("\"role\":\"leader\""), "{page:?}");

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
            .filter(|p| pod_ready(p))
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
    // `helm test`: up now; not up once no operator pod runs (the leader released the Lease).
    // (No --logs: the pod is deleted once it succeeded, and helm would fail to fetch its log; a
    // failed one stays, with its log.)
    let test = std::process::Command::new("helm").args(["test", "tqo", "--namespace", &ops]).output().unwrap();
    let out = String::from_utf8_lossy(&test.stdout).to_string() + &String::from_utf8_lossy(&test.stderr);
    assert!(test.status.success() && out.contains("TEST SUITE:     tqo-test"), "helm test: {out}");
    run("kubectl", &["scale", "deployment/tqo", "-n", &ops, "--replicas=0"]);
    wait_for("no operator pod", T, || async { operator_pods(&client, &ops).await.is_empty().then_some(()) }).await;
    let test =
        std::process::Command::new("helm").args(["test", "tqo", "--namespace", &ops, "--logs"]).output().unwrap();
    let out = String::from_utf8_lossy(&test.stdout).to_string() + &String::from_utf8_lossy(&test.stderr);
    assert!(!test.status.success(), "helm test passes with no operator running: {out}");
    assert!(out.contains("the Lease has no holder"), "the check says why (its log): {out}");
    println!(
        "helm test with no operator pod: {}",
        out.lines().filter(|l| l.contains("error")).collect::<Vec<_>>().join(" | ")
    );
    run("helm", &["uninstall", "tqo", "--namespace", &ops]);
    delete_namespace(&client, &work).await;
    delete_namespace(&client, &ops).await;
}

/// A pool of up to 2 pods that each run one task of `seconds` (concurrency 1, prefetch 1, acks
/// late: a worker then holds one task, not one running and one reserved), with in-flight work not
/// counted: once both pods hold their task the pool's demand is 0 and it scales in after a 6 s
/// window, long enough for each worker's heartbeat (every 2 s) to report its running task.
fn one_task_per_pod(name: &str, queue: &str, seconds: u32, env: &[(&str, &str)]) -> serde_json::Value {
    let mut tq = real_pool(
        name,
        queue,
        json!({"minReplicas": 0, "maxReplicas": 2, "tasksPerReplica": 1, "countInFlight": false,
               "pollInterval": "1s", "scaleDown": {"stabilizationWindow": "6s"}}),
    );
    tq["spec"]["worker"]["concurrency"] = json!(1);
    let mut vars = vec![
        json!({"name": "TASK_RECORD_KEY", "value": "done"}),
        json!({"name": "TASK_SCALE", "value": seconds.to_string()}),
        json!({"name": "CELERY_ACKS_LATE", "value": "1"}),
    ];
    vars.extend(env.iter().map(|(k, v)| json!({"name": k, "value": v})));
    tq["spec"]["worker"]["env"] = json!(vars);
    tq
}

/// Scale-in with work running (the README's claim, observed): pods removed while each runs a
/// task shorter than the grace period get SIGTERM as Celery's PID 1, finish the task (warm
/// shutdown) and exit; nothing is lost. The worker starts through a `commandPrefix`
/// (`python -m celery`), as apps with a wrapper do. Before the scale-in the operator has put
/// each pod's `pod-deletion-cost` from its worker's heartbeat, matched by the real pod name,
/// and left alone a pod of someone else's that carries the same labels. (The 1.20
/// controller-manager here ignores that annotation: which pod goes first is not tested.)
#[tokio::test]
#[ignore = "needs the lab's node: make test"]
async fn pods_scaled_in_while_running_a_task_finish_it_and_lose_nothing() {
    let _node = NODE.read().await;
    let Some((_, client, ns, redis)) =
        setup("pods_scaled_in_while_running_a_task_finish_it_and_lose_nothing", "scalein").await
    else {
        return;
    };
    let operator = Operator::start(&client, &ns);
    let mut tq = one_task_per_pod("busy", "busyq", 15, &[]);
    tq["spec"]["worker"]["commandPrefix"] = json!(["python", "-m"]);
    create_taskqueue(&client, &ns, tq).await;
    // Another chart's pod with the worker labels (it never schedules: no toleration).
    let decoy: Pod = serde_json::from_value(json!({
        "metadata": {"name": "decoy", "labels": {"app.kubernetes.io/name": "celery-worker", "app.kubernetes.io/instance": "busy"}},
        "spec": {"containers": [{"name": "c", "image": WORKER_IMAGE}]}
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&Default::default(), &decoy).await.unwrap();
    celery(&redis.url(), &["ids", "busyq", "2", "busy-"]);
    wait_replicas(&client, &ns, "busy", 2).await;

    // Watch the pods until the scale-in: their deletion costs as the operator set them.
    let lp = ListParams::default().labels("app.kubernetes.io/instance=busy");
    let mut costs = costs_until_scale_in(&client, &ns, "busy", &lp).await;
    let scaled_in = std::time::Instant::now();
    println!("deletion costs before the scale-in: {costs:?}");
    assert_eq!(costs.remove("decoy"), None, "a pod the Deployment does not own gets no cost");
    assert!(
        costs.len() == 2 && costs.values().all(|c| c == "1"),
        "each busy pod's cost is its 1 running task, matched by its real name: {costs:?}"
    );
    let command = deployment(&client, &ns, "busy").await.unwrap().spec.unwrap().template.spec.unwrap().containers[0]
        .command
        .clone()
        .unwrap();
    assert_eq!(command[..4], ["python", "-m", "celery", "-A"], "{command:?}");
    pods.delete("decoy", &Default::default()).await.unwrap();
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

/// A pool scaled in while its pods run a task longer than `terminationGracePeriodSeconds`, with
/// `acks_late`: the removed pod is killed mid-task, its message stays in kombu's `unacked` and
/// the remaining worker restores it after the transport's `visibility_timeout` (30 s here, 1 h by
/// default): it runs again, redelivered, and finishes. Nothing lost; the figures say how long the
/// task waited. The operator holds a replica meanwhile (only a running worker restores).
#[tokio::test]
#[ignore = "needs the lab's node: make test"]
async fn a_task_longer_than_the_grace_period_is_redelivered_after_the_visibility_timeout() {
    let _node = NODE.read().await;
    let test = "a_task_longer_than_the_grace_period_is_redelivered_after_the_visibility_timeout";
    let Some((_, client, ns, redis)) = setup(test, "redeliver").await else {
        return;
    };
    let operator = Operator::start(&client, &ns);
    // One 20 s task per pod, a 3 s grace period.
    let mut tq = one_task_per_pod("long", "longq", 20, &[("CELERY_VISIBILITY_TIMEOUT", "30")]);
    tq["spec"]["worker"]["terminationGracePeriodSeconds"] = json!(3);
    create_taskqueue(&client, &ns, tq).await;
    celery(&redis.url(), &["ids", "longq", "2", "long-"]);
    wait_replicas(&client, &ns, "long", 2).await;
    let scaled_in = wait_for("the scale-in while both tasks run", T, || async {
        deployment(&client, &ns, "long").await.filter(|d| replicas(d) < 2).map(|_| std::time::Instant::now())
    })
    .await;
    let scaled_in_at = unix_now() - scaled_in.elapsed().as_secs_f64();
    assert_eq!(hlen(&redis.url(), "done").await, 0, "both tasks were still running at the scale-in");

    // Both finish, one of them on its second start.
    wait_for("both tasks recorded", Duration::from_secs(300), || async {
        (hlen(&redis.url(), "done").await == 2).then_some(())
    })
    .await;
    let starts = starts(&redis.url(), "").await;
    println!("starts: {starts:?}");
    assert_eq!(starts.len(), 3, "two starts, and one more for the task cut short: {starts:?}");
    let again = starts.iter().find(|s| s.redelivered).expect("one start is a redelivery");
    let first = starts.iter().find(|s| s.id == again.id && !s.redelivered).expect("its first start");
    assert!(again.t > scaled_in_at, "it ran again after the scale-in: {starts:?}");
    let mut c = redis_conn(&redis.url()).await;
    let (pending, unacked): (i64, i64) =
        redis::pipe().cmd("LLEN").arg("longq").cmd("HLEN").arg("unacked").query_async(&mut c).await.unwrap();
    assert_eq!((pending, unacked), (0, 0), "nothing left behind");
    println!(
        "the task cut short (first on {}, again on {}) ran again {:.1} s after the scale-in ({:.1} s after its pod's grace \
         period ended), {:.1} s after its first start; visibility_timeout 30 s, kombu 5.7 restores every ~100 s",
        first.worker,
        again.worker,
        again.t - scaled_in_at,
        again.t - scaled_in_at - 3.0,
        again.t - first.t
    );
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

/// Serializes the node's faults against the other tests here: a kubelet or containerd restart
/// must not land in the middle of another test's scale-in. The fault test takes it to write,
/// the others to read.
static NODE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// What the fault test does to the node.
enum Fault {
    /// `node.sh ARGS`: restart the kubelet or containerd.
    Node(&'static [&'static str]),
    /// SIGKILL the container of a worker pod running one of the batch's tasks.
    KillWorker,
    /// Delete the operator's leader pod (as `kubectl delete pod` does: with its grace period).
    DeleteLeader,
    /// SIGKILL the operator leader's container: the kubelet restarts it in the same pod.
    KillLeader,
}

/// One reading of the pool while a fault plays out.
#[derive(Default)]
struct Watch {
    desired: (i32, i32),
    /// How long ready pods were fewer than the replicas asked for.
    below: Duration,
    /// When ready came back to desired after it fell below, from the fault.
    back: Option<Duration>,
    /// The pool's container restarts, the most seen (a killed pod may go with the scale-in).
    restarts: i32,
}

/// The node's faults, each while a pool of real workers (acks late, one 8 s task per pod) runs a
/// batch: the kubelet restarted, containerd restarted, a worker container SIGKILLed mid-task, the
/// in-cluster operator's leader pod deleted, its leader container SIGKILLed. For each: the pool's replicas before, during and
/// after, and every task of the batch run (a task cut short runs again: kombu restores it after
/// the visibility timeout, 20 s here). The operator runs from the chart, as in a cluster. With
/// TQ_UPDATE_DOCS=1 the table goes to docs/reliability.md.
#[tokio::test]
#[ignore = "needs the lab's node: make test"]
async fn node_side_faults_keep_the_pools_replicas_and_lose_no_task() {
    let test = "node_side_faults_keep_the_pools_replicas_and_lose_no_task";
    let _node = NODE.write().await;
    let Some((lab, client, work, redis)) = setup(test, "nodefault").await else { return };
    if std::env::var_os("TQ_HOST_PID").is_none() {
        skipped(test, "TQ_HOST_PID unset (the host's namespaces, to restart the kubelet): run it with `make test`");
        return;
    }
    let ops = namespace(&client, "nodefault-ops").await;
    let (_, mut leader) = install_operator(&client, &lab, &ops, &work).await;
    let mut tq = real_pool(
        "steady",
        "steadyq",
        json!({"minReplicas": 1, "maxReplicas": 3, "tasksPerReplica": 2, "pollInterval": "1s",
               "scaleDown": {"stabilizationWindow": "10s"}}),
    );
    tq["spec"]["worker"]["concurrency"] = json!(1);
    tq["spec"]["worker"]["env"] = json!([
        {"name": "TASK_RECORD_KEY", "value": "done"}, {"name": "TASK_SCALE", "value": "8"},
        {"name": "CELERY_ACKS_LATE", "value": "1"}, {"name": "CELERY_VISIBILITY_TIMEOUT", "value": "20"}
    ]);
    create_taskqueue(&client, &work, tq).await;
    wait_ready(&client, &work, "steady", 1).await;

    let faults: [(&str, Fault); 5] = [
        ("kubelet restarted (TERM, started again)", Fault::Node(&["restart", "kubelet"])),
        ("containerd restarted (TERM, started again)", Fault::Node(&["restart", "containerd"])),
        ("a worker container SIGKILLed mid-task", Fault::KillWorker),
        ("the operator's leader pod deleted", Fault::DeleteLeader),
        ("the operator's leader container SIGKILLed (the kubelet restarts it)", Fault::KillLeader),
    ];
    let mut rows = Vec::new();
    for (i, (what, fault)) in faults.iter().enumerate() {
        let prefix = format!("f{i}-");
        // 6 tasks: 3 pods, each running one when the fault comes.
        celery(&redis.url(), &["ids", "steadyq", "6", &prefix]);
        wait_ready(&client, &work, "steady", 3).await;
        wait_for("3 of the batch running", T, || async {
            (starts(&redis.url(), &prefix).await.len() >= 3).then_some(())
        })
        .await;
        let before = pool_replicas(&client, &work).await;
        let t0 = std::time::Instant::now();
        match fault {
            Fault::Node(args) => {
                Lab::node_sh(args).expect("TQ_HOST_PID");
            }
            Fault::KillWorker => {
                let running = starts(&redis.url(), &prefix).await;
                let pod = running[0].worker.split_once('@').unwrap().1.to_string();
                let id = container_id(&client, &work, &pod, "worker").await;
                Lab::node_sh(&["kill-container", &id]).expect("TQ_HOST_PID");
            }
            Fault::DeleteLeader => {
                run("kubectl", &["delete", "pod", "-n", &ops, &leader, "--wait=false"]);
            }
            Fault::KillLeader => {
                let id = container_id(&client, &ops, &leader, "operator").await;
                Lab::node_sh(&["kill-container", &id]).expect("TQ_HOST_PID");
            }
        }
        // Watch the pool until every task of the batch ran.
        let mut w = Watch { desired: (before.0, before.0), ..Default::default() };
        let tick = Duration::from_millis(200);
        while hlen_prefix(&redis.url(), &prefix).await < 6 {
            assert!(t0.elapsed() < Duration::from_secs(300), "{what}: not every task ran within 300 s");
            let (desired, ready) = pool_replicas(&client, &work).await;
            w.desired = (w.desired.0.min(desired), w.desired.1.max(desired));
            w.restarts = w.restarts.max(container_restarts(&client, &work).await);
            if ready < desired {
                w.below += tick;
            } else if !w.below.is_zero() && w.back.is_none() {
                w.back = Some(t0.elapsed());
            }
            tokio::time::sleep(tick).await;
        }
        let ran_in = t0.elapsed();
        // Started twice: a task cut short. Redelivered at its first start: a message kombu restored
        // before any worker ran it (delivered to a worker that let it go).
        let batch = starts(&redis.url(), &prefix).await;
        let mut seen = std::collections::HashSet::new();
        let again = batch.iter().filter(|s| !seen.insert(s.id.as_str())).count();
        let mut seen = std::collections::HashSet::new();
        let restored_first = batch.iter().filter(|s| seen.insert(s.id.as_str()) && s.redelivered).count();
        if again + restored_first > 0 {
            println!("{what}: the batch's starts {batch:?}");
        }
        let after = pool_replicas(&client, &work).await;
        match fault {
            Fault::DeleteLeader => {
                leader = wait_for("another operator pod to hold the Lease", T, || async {
                    lease_holder(&client, &ops).await.filter(|h| *h != leader)
                })
                .await;
            }
            Fault::KillLeader => {
                // The kubelet restarts the killed container in its pod, which is Ready again; the
                // Lease names a live pod (the standby, or the restarted one under its old name).
                let pods: Api<Pod> = Api::namespaced(client.clone(), &ops);
                wait_for("the killed operator container restarted and Ready", T, || async {
                    let p = pods.get(&leader).await.ok()?;
                    let restarts = p.status.as_ref()?.container_statuses.as_ref()?.first()?.restart_count;
                    (restarts >= 1 && pod_ready(&p)).then_some(())
                })
                .await;
                let live: Vec<String> =
                    operator_pods(&client, &ops).await.iter().filter_map(|p| p.metadata.name.clone()).collect();
                leader = wait_for("a live operator pod to hold the Lease", T, || async {
                    lease_holder(&client, &ops).await.filter(|h| live.contains(h))
                })
                .await;
                println!("{what}: the Lease is now held by {leader}");
            }
            _ => {}
        }
        let back = w.back.map_or("—".to_string(), |b| format!("{:.1} s after the fault", b.as_secs_f64()));
        rows.push(format!(
            "| {what} | {}/{} | {}..{} | {:.1} s | {back} | {}/{} | 6 sent, 6 ran in {:.0} s, {again} started twice, {restored_first} redelivered before their first start, **0 lost** | {} |",
            before.0, before.1, w.desired.0, w.desired.1, w.below.as_secs_f64(), after.0, after.1, ran_in.as_secs_f64(), w.restarts
        ));
        println!("{}", rows.last().unwrap());
        // The pool at its minimum again before the next fault.
        wait_ready(&client, &work, "steady", 1).await;
    }
    let table = format!(
        "| fault (operator in the cluster from the chart, 2 replicas) | pool desired/ready at the fault | desired while it played out | ready below desired for | ready back to desired | desired/ready once the batch ran | tasks | container restarts in the pool |\n|---|---|---|---|---|---|---|---|\n{}\n",
        rows.join("\n")
    );
    print!("{table}");
    docs::measured("docs/reliability.md", "node-faults", &table);
    run("helm", &["uninstall", "tqo", "--namespace", &ops]);
    delete_namespace(&client, &work).await;
}

async fn hlen_prefix(url: &str, prefix: &str) -> usize {
    let mut c = redis_conn(url).await;
    let ids: Vec<String> = redis::cmd("HKEYS").arg("done").query_async(&mut c).await.unwrap();
    ids.iter().filter(|i| i.starts_with(prefix)).count()
}

/// The `steady` pool's Deployment: (spec.replicas, status.readyReplicas).
async fn pool_replicas(client: &kube::Client, ns: &str) -> (i32, i32) {
    let d = deployment(client, ns, "steady").await.expect("the pool's Deployment");
    (replicas(&d), d.status.and_then(|s| s.ready_replicas).unwrap_or(0))
}

/// Waits until the pool asks for `n` replicas and runs `n` ready pods.
async fn wait_ready(client: &kube::Client, ns: &str, name: &str, n: i32) {
    wait_for(&format!("{name}: {n} replicas, all ready"), T, || async {
        let d = deployment(client, ns, name).await?;
        let ready = d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
        (replicas(&d) == n && ready == n).then_some(())
    })
    .await;
}

async fn container_id(client: &kube::Client, ns: &str, pod: &str, container: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let p = pods.get(pod).await.unwrap();
    let statuses = p.status.and_then(|s| s.container_statuses).unwrap_or_default();
    statuses.into_iter().find(|c| c.name == container).and_then(|c| c.container_id).expect("the container's id")
}

async fn container_restarts(client: &kube::Client, ns: &str) -> i32 {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels("app.kubernetes.io/instance=steady");
    let items = pods.list(&lp).await.unwrap().items;
    items
        .iter()
        .flat_map(|p| p.status.iter().flat_map(|s| s.container_statuses.iter().flatten()))
        .map(|c| c.restart_count)
        .sum()
}

/// A pool whose `globalKeyprefix` is not the app's: its pods run and are Ready, but the
/// operator hears none of their workers (kombu prefixes the event channels too) and counts
/// lists nobody fills. After 60 s of Ready pods unheard, `WorkersHeard=False` names the setting;
/// set right, the workers are heard and it turns True.
#[tokio::test]
#[ignore = "needs the lab's node: make test"]
async fn a_pool_whose_key_prefix_is_not_the_apps_says_which_setting() {
    let _node = NODE.read().await;
    let Some((_, client, ns, _redis)) =
        setup("a_pool_whose_key_prefix_is_not_the_apps_says_which_setting", "prefix").await
    else {
        return;
    };
    let operator = Operator::start(&client, &ns);
    let mut tq = real_pool("pfx", "pfxq", json!({"minReplicas": 1, "maxReplicas": 2, "pollInterval": "1s"}));
    tq["spec"]["broker"]["transportOptions"] = json!({"globalKeyprefix": "other:"});
    create_taskqueue(&client, &ns, tq).await;
    wait_for("the pool's pod Ready", T, || async { (!ready_pods(&client, &ns, "pfx").await.is_empty()).then_some(()) })
        .await;
    let ready_at = std::time::Instant::now();
    let message = wait_condition(&client, &ns, "pfx", "WorkersHeard", "False").await;
    println!("WorkersHeard=False {:.0} s after the pod was Ready: {message}", ready_at.elapsed().as_secs_f64());
    assert!(message.contains("globalKeyprefix") && message.contains("other:/0.celeryev/worker.heartbeat"), "{message}");
    assert!(!events(&client, &ns, "pfx", "WorkersNotHeard").await.is_empty(), "a Warning Event too");

    let api: Api<taskqueue_operator::crd::TaskQueue> = Api::namespaced(client.clone(), &ns);
    let fix = kube::api::Patch::Merge(json!({"spec": {"broker": {"transportOptions": {"globalKeyprefix": null}}}}));
    api.patch("pfx", &Default::default(), &fix).await.unwrap();
    let message = wait_condition(&client, &ns, "pfx", "WorkersHeard", "True").await;
    println!("after the fix: WorkersHeard=True: {message}");
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

/// An app's own Deployment (as its chart writes it: its own labels, its own command through
/// `python -m`, `-n own@%h`) scaled through `spec.scaleTargetRef`: the operator reads the
/// worker name from the command, hears the pods' workers, puts each busy pod's deletion cost
/// before the scale-in, and never touches the template; both tasks finish.
#[tokio::test]
#[ignore = "needs the lab's node: make test"]
async fn an_apps_own_deployment_is_scaled_and_its_busy_pods_are_kept() {
    let _node = NODE.read().await;
    let Some((_, client, ns, redis)) =
        setup("an_apps_own_deployment_is_scaled_and_its_busy_pods_are_kept", "own").await
    else {
        return;
    };
    let app = json!({
        "metadata": {"name": "app-worker"},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "shop", "role": "worker"}},
            "template": {
                "metadata": {"labels": {"app": "shop", "role": "worker"}},
                "spec": {
                    "tolerations": [Lab::toleration()],
                    "containers": [{
                        "name": "app", "image": WORKER_IMAGE,
                        "command": ["python", "-m", "celery", "-A", "app.worker", "worker", "-Q", "ownq", "-c", "1",
                                    "-n", "own@%h", "--prefetch-multiplier=1"],
                        "env": [
                            {"name": "CELERY_BROKER_URL", "valueFrom": {"secretKeyRef": {"name": "celery-broker", "key": "url"}}},
                            {"name": "TASK_RECORD_KEY", "value": "done"},
                            {"name": "TASK_SCALE", "value": "15"},
                            {"name": "CELERY_ACKS_LATE", "value": "1"}
                        ]
                    }]
                }
            }
        }
    });
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), &ns);
    let before = deployments.create(&Default::default(), &serde_json::from_value(app).unwrap()).await.unwrap();
    let mut tq = pool(
        "own",
        "ownq",
        json!({"minReplicas": 0, "maxReplicas": 2, "countInFlight": false, "pollInterval": "1s",
               "scaleDown": {"stabilizationWindow": "6s"}}),
    );
    tq["spec"].as_object_mut().unwrap().remove("worker");
    tq["spec"]["scaleTargetRef"] = json!({"name": "app-worker"});
    create_taskqueue(&client, &ns, tq).await;
    let operator = Operator::start(&client, &ns);
    celery(&redis.url(), &["ids", "ownq", "2", "own-"]);
    wait_replicas(&client, &ns, "app-worker", 2).await;
    let heard = wait_for("WorkersHeard=True", T, || async {
        condition(&taskqueue(&client, &ns, "own").await, "WorkersHeard").filter(|c| c.0 == "True").map(|c| c.2)
    })
    .await;
    println!("WorkersHeard=True: {heard}");

    let lp = ListParams::default().labels("app=shop,role=worker");
    let costs = costs_until_scale_in(&client, &ns, "app-worker", &lp).await;
    println!("deletion costs before the scale-in: {costs:?}");
    assert!(
        costs.len() == 2 && costs.values().all(|c| c == "1"),
        "each busy pod's cost is its 1 running task, its worker found as own@<pod name>: {costs:?}"
    );
    wait_for("both tasks recorded", T, || async { (hlen(&redis.url(), "done").await == 2).then_some(()) }).await;
    wait_replicas(&client, &ns, "app-worker", 0).await;
    let after = deployment(&client, &ns, "app-worker").await.unwrap();
    let template =
        |d: &k8s_openapi::api::apps::v1::Deployment| serde_json::to_value(&d.spec.as_ref().unwrap().template).unwrap();
    assert_eq!(template(&after), template(&before), "the app's template is never written");
    let matches = condition(&taskqueue(&client, &ns, "own").await, "WorkerMatches").unwrap();
    assert_eq!(matches.0, "True", "{matches:?}");
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

/// The `sep` the app's kombu uses, told from the queue's binding once the pool is heard: a
/// pool whose spec says `:` (the app uses kombu's default) shows `KeysMatch=False` naming the
/// setting, and True once the spec is fixed.
#[tokio::test]
#[ignore = "needs the lab's node: make test"]
async fn a_pool_whose_separator_is_not_the_apps_says_which_setting() {
    let _node = NODE.read().await;
    let Some((_, client, ns, _redis)) = setup("a_pool_whose_separator_is_not_the_apps_says_which_setting", "sep").await
    else {
        return;
    };
    let operator = Operator::start(&client, &ns);
    let mut tq = real_pool("sep", "sepq", json!({"minReplicas": 1, "maxReplicas": 2, "pollInterval": "1s"}));
    tq["spec"]["broker"]["transportOptions"] = json!({"sep": ":"});
    create_taskqueue(&client, &ns, tq).await;
    let started = std::time::Instant::now();
    let message = wait_condition(&client, &ns, "sep", "KeysMatch", "False").await;
    println!("KeysMatch=False {:.0} s after the TaskQueue was created: {message}", started.elapsed().as_secs_f64());
    assert!(
        message.contains("spec.broker.transportOptions.sep \":\"") && message.contains("sep \"\\u{6}\\u{16}\""),
        "{message}"
    );
    assert!(!events(&client, &ns, "sep", "SeparatorMismatch").await.is_empty(), "a Warning Event too");
    let api: Api<taskqueue_operator::crd::TaskQueue> = Api::namespaced(client.clone(), &ns);
    let fix = kube::api::Patch::Merge(json!({"spec": {"broker": {"transportOptions": {"sep": null}}}}));
    api.patch("sep", &Default::default(), &fix).await.unwrap();
    let message = wait_condition(&client, &ns, "sep", "KeysMatch", "True").await;
    println!("after the fix: KeysMatch=True: {message}");
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}

/// The deletion costs the operator put on the pods `lp` selects, watched until Deployment `name`
/// goes below 2 replicas (the Deployment first: its pods, terminating, still show the costs).
async fn costs_until_scale_in(
    client: &kube::Client,
    ns: &str,
    name: &str,
    lp: &ListParams,
) -> std::collections::BTreeMap<String, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut costs = std::collections::BTreeMap::new();
    let started = std::time::Instant::now();
    loop {
        assert!(started.elapsed() < T, "no scale-in within {T:?}; costs seen: {costs:?}");
        let done = deployment(client, ns, name).await.is_some_and(|d| replicas(&d) < 2);
        for p in pods.list(lp).await.unwrap().items {
            let cost =
                p.metadata.annotations.as_ref().and_then(|a| a.get("controller.kubernetes.io/pod-deletion-cost"));
            if let (Some(name), Some(cost)) = (p.metadata.name.clone(), cost) {
                costs.insert(name, cost.clone());
            }
        }
        if done {
            return costs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The message of condition `type_` of TaskQueue `name` once it has `status`.
async fn wait_condition(client: &kube::Client, ns: &str, name: &str, type_: &str, status: &str) -> String {
    wait_for(&format!("{type_}={status}"), T, || async {
        condition(&taskqueue(client, ns, name).await, type_).filter(|c| c.0 == status).map(|c| c.2)
    })
    .await
}
