//! The Helm chart with the real Helm binary: lint, the strict values schema, secure defaults and
//! least-privilege RBAC in the rendered chart; then an install into the real API server, with the
//! operator run out of cluster on the chart's ServiceAccount token through the seed scenario.

mod support;

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::Api;
use serde_json::{json, Value};
use support::*;

fn helm_out(args: &[&str]) -> std::process::Output {
    Command::new("helm").args(args).output().expect("helm on PATH (deploy/local/helm.sh fetches it)")
}

fn helm(args: &[&str]) -> String {
    run("helm", args)
}

fn chart() -> String {
    repo().join("charts/taskqueue-operator").to_str().unwrap().to_string()
}

/// `helm template` with `--set` values, as JSON documents.
fn render(sets: &[&str]) -> Vec<Value> {
    render_all(sets).into_iter().filter(|d| d["metadata"]["annotations"]["helm.sh/hook"].is_null()).collect()
}

/// The `helm test` hook's documents.
fn render_hooks(sets: &[&str]) -> Vec<Value> {
    render_all(sets).into_iter().filter(|d| d["metadata"]["annotations"]["helm.sh/hook"] == "test").collect()
}

fn render_all(sets: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec!["template", "tq", chart.as_str(), "--namespace", "ops"];
    for s in sets {
        args.extend(["--set", s]);
    }
    serde_yaml::Deserializer::from_str(&helm(&args))
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| format!("{}/{}", d["kind"].as_str().unwrap(), d["metadata"]["namespace"].as_str().unwrap_or("-")))
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in {:?}", kinds(docs)))
}

/// Every RBAC rule of the rendered chart, with where it applies.
fn rules(docs: &[Value]) -> Vec<(String, Value)> {
    docs.iter()
        .filter(|d| d["kind"] == "Role" || d["kind"] == "ClusterRole")
        .flat_map(|d| {
            let at = format!("{}/{}", d["kind"].as_str().unwrap(), d["metadata"]["namespace"].as_str().unwrap_or("*"));
            d["rules"].as_array().unwrap().iter().map(move |r| (at.clone(), r.clone()))
        })
        .collect()
}

/// The seed's command output with the one column no two runs share (`kubectl get`'s AGE, the 8th)
/// blanked and the spacing that follows its width collapsed.
fn without_ages(output: &str) -> String {
    let mut in_get = false;
    let mut lines = Vec::new();
    for line in output.lines() {
        in_get = (in_get || line.starts_with("$ kubectl get")) && !line.starts_with("$ taskqueue-operator");
        let mut words: Vec<&str> = line.split_whitespace().collect();
        if in_get && !line.starts_with('$') && words.len() > 8 {
            words[7] = "AGE";
        }
        lines.push(words.join(" "));
    }
    lines.join("\n")
}

fn verbs(rules: &[(String, Value)], resource: &str) -> Vec<String> {
    rules
        .iter()
        .filter(|(_, r)| r["resources"].as_array().unwrap().iter().any(|x| x == resource))
        .flat_map(|(_, r)| r["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()))
        .collect()
}

#[test]
#[ignore = "needs helm: make test"]
fn chart_lints_and_renders_secure_ha_defaults_with_least_privilege_rbac() {
    let lint = helm(&["lint", "--strict", &chart()]);
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    support::docs::checked(
        "docs/install.md",
        "lint",
        &format!("```\n{}\n```\n", lint.trim().replace(&chart(), "charts/taskqueue-operator")),
        str::to_string,
    );

    // Defaults: two replicas, leader election, rolling updates, a PDB, the metrics Service.
    let docs = render(&[]);
    assert_eq!(
        kinds(&docs),
        [
            "PodDisruptionBudget/ops",
            "ServiceAccount/ops",
            "ClusterRole/-",
            "ClusterRoleBinding/-",
            "Role/ops",
            "RoleBinding/ops",
            "Service/ops",
            "Deployment/ops"
        ]
    );
    let dep = find(&docs, "Deployment");
    assert_eq!(dep["spec"]["replicas"], 2);
    assert_eq!(dep["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(find(&docs, "PodDisruptionBudget")["spec"]["maxUnavailable"], 1);
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(
        c["args"],
        json!([
            "run",
            "--metrics-addr",
            "0.0.0.0:8080",
            "--leader-election=true",
            "--lease-name=tq",
            "--concurrency=32",
            "--broker-timeout=2s",
            "--max-broker-reply=1Mi"
        ])
    );
    let env: Vec<&str> = c["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(env.contains(&"POD_NAMESPACE") && env.contains(&"POD_NAME"), "{env:?}");
    // Secure by default.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert!(c["resources"]["requests"]["cpu"].is_string() && c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string(), "a memory limit");
    assert_eq!(find(&docs, "Service")["spec"]["ports"][0]["targetPort"], "metrics");

    // Least privilege: no wildcard, Secrets get only, no Deployment delete, no Pod create,
    // Leases only in the release namespace.
    let all = rules(&docs);
    for (at, r) in &all {
        for field in ["apiGroups", "resources", "verbs"] {
            assert!(r[field].as_array().unwrap().iter().all(|x| x != "*"), "wildcard in {at}: {r}");
        }
    }
    assert_eq!(verbs(&all, "secrets"), ["get"]);
    assert!(!verbs(&all, "deployments").contains(&"delete".to_string()));
    assert_eq!(verbs(&all, "pods"), ["list", "patch"]);
    assert_eq!(verbs(&all, "replicasets"), ["list"], "to tell the Deployment's own pods from look-alikes");
    let leases: Vec<&(String, Value)> = all.iter().filter(|(_, r)| r["resources"] == json!(["leases"])).collect();
    assert!(!leases.is_empty() && leases.iter().all(|(at, _)| at == "Role/ops"), "{leases:?}");
    let mut table = String::from("| where | apiGroups | resources | resourceNames | verbs |\n|---|---|---|---|---|\n");
    for (at, r) in &all {
        let list = |v: &Value| {
            v.as_array().map_or("-".into(), |a| {
                a.iter()
                    .map(|x| x.as_str().unwrap_or(""))
                    .map(|x| if x.is_empty() { "\"\"" } else { x })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
        };
        table.push_str(&format!(
            "| {at} | {} | {} | {} | {} |\n",
            list(&r["apiGroups"]),
            list(&r["resources"]),
            list(&r["resourceNames"]),
            list(&r["verbs"])
        ));
    }
    support::docs::checked("docs/install.md", "rbac", &table, str::to_string);

    // Every toggle on.
    let docs = render(&["serviceMonitor.enabled=true", "serviceMonitor.labels.release=prom"]);
    assert_eq!(find(&docs, "ServiceMonitor")["metadata"]["labels"]["release"], "prom");
    // One namespace watched: Roles only, no ClusterRole at all.
    let docs = render(&["watchNamespace=prod"]);
    let k = kinds(&docs);
    assert!(!k.iter().any(|k| k.starts_with("Cluster")), "{k:?}");
    assert!(k.contains(&"Role/prod".to_string()) && k.contains(&"RoleBinding/prod".to_string()), "{k:?}");
    let args = &find(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(args.as_array().unwrap()[8..], [json!("--namespace"), json!("prod")]);
    // Several: a Role and RoleBinding in each, and nowhere else.
    let docs = render(&["watchNamespaces={team-a,team-b}", "watchNamespace=team-a"]);
    let k = kinds(&docs);
    assert!(!k.iter().any(|k| k.starts_with("Cluster")), "{k:?}");
    for ns in ["team-a", "team-b"] {
        for kind in ["Role", "RoleBinding"] {
            assert_eq!(k.iter().filter(|x| **x == format!("{kind}/{ns}")).count(), 1, "{kind} in {ns}: {k:?}");
        }
    }
    assert_eq!(k.iter().filter(|x| x.starts_with("Role/") || x.starts_with("RoleBinding/")).count(), 6, "{k:?}");
    let args = &find(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(args.as_array().unwrap()[8..], [json!("--namespace"), json!("team-a,team-b")]);
    // The pod policy: nothing beyond an ordinary pod unless allowed, each value its own word.
    let policy_args = |docs: &[Value]| -> Vec<String> {
        let args = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"].clone();
        let args = args.as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string());
        args.filter(|a| a.starts_with("--pod-policy-allow")).collect()
    };
    assert!(policy_args(&render(&[])).is_empty(), "strict by default");
    // The optional NetworkPolicy: only the metrics port, only from the listed peers.
    assert!(!kinds(&render(&[])).contains(&"NetworkPolicy/ops".to_string()), "off by default");
    let docs = render(&[
        "networkPolicy.enabled=true",
        "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring",
    ]);
    let np = &find(&docs, "NetworkPolicy")["spec"];
    assert_eq!(np["podSelector"]["matchLabels"]["app.kubernetes.io/instance"], "tq");
    assert_eq!(np["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        np["ingress"],
        json!([{"ports": [{"port": "metrics", "protocol": "TCP"}],
                "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}])
    );
    let args = find(&render(&["brokerAllow={redis.celery.svc:6379,10.0.0.0/8:*}"]), "Deployment")["spec"]["template"]
        ["spec"]["containers"][0]["args"]
        .clone();
    assert!(args.as_array().unwrap().contains(&json!("--broker-allow=redis.celery.svc:6379,10.0.0.0/8:*")), "{args}");
    let docs = render(&["podPolicy.allowHostPath=true", "podPolicy.allowServiceAccount=true"]);
    assert_eq!(policy_args(&docs), ["--pod-policy-allow=host-path,service-account"]);
    // `helm test`: a pod of the operator's image runs `check` with a ServiceAccount that may only
    // read the Lease and list pods.
    let hooks = render_hooks(&[]);
    assert_eq!(kinds(&hooks), ["ServiceAccount/ops", "Role/ops", "RoleBinding/ops", "Pod/ops"]);
    let check = &find(&hooks, "Pod")["spec"];
    assert_eq!(
        check["containers"][0]["args"],
        json!([
            "check",
            "--namespace=ops",
            "--lease=tq",
            "--selector=app.kubernetes.io/name=taskqueue-operator,app.kubernetes.io/instance=tq"
        ])
    );
    assert_eq!(check["serviceAccountName"], "tq-test");
    assert_eq!(
        find(&hooks, "Role")["rules"],
        json!([
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["tq"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}
        ])
    );
    // The ecosystem's conventions: names, the ServiceAccount, RBAC, the image, extra args,
    // scrape annotations and the security contexts, each overridable.
    let digest = format!("sha256:{}", "a".repeat(64));
    let docs = render(&[
        "fullnameOverride=team-a-op",
        "serviceAccount.create=false",
        "serviceAccount.name=ops-sa",
        "rbac.create=false",
        "image.registry=reg.example.com",
        &format!("image.digest={digest}"),
        "scrapeAnnotations=false",
        "extraArgs[0]=--broker-timeout=5s",
        "podSecurityContext.runAsUser=null",
        "podSecurityContext.runAsGroup=null",
    ]);
    let k = kinds(&docs);
    assert!(!k.iter().any(|k| k.starts_with("ServiceAccount") || k.contains("Role")), "nothing to create: {k:?}");
    let d = find(&docs, "Deployment");
    assert_eq!(d["metadata"]["name"], "team-a-op");
    assert_eq!(find(&docs, "Service")["metadata"]["name"], "team-a-op-metrics");
    let pod = &d["spec"]["template"];
    assert_eq!(pod["spec"]["serviceAccountName"], "ops-sa");
    assert_eq!(
        pod["spec"]["securityContext"],
        json!({"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}}),
        "OpenShift's restricted SCC: no fixed uid"
    );
    assert!(pod["metadata"]["annotations"].is_null(), "no scrape annotations: {}", pod["metadata"]);
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], format!("reg.example.com/taskqueue-operator@{digest}"));
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.contains(&"--lease-name=team-a-op") && args.last() == Some(&"--broker-timeout=5s"), "{args:?}");
    let docs = render(&["nameOverride=celery-scaler", "serviceAccount.annotations.team=a"]);
    let d = find(&docs, "Deployment");
    assert_eq!(d["metadata"]["name"], "tq-celery-scaler");
    assert_eq!(d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"], "celery-scaler");
    assert_eq!(find(&docs, "ServiceAccount")["metadata"]["annotations"]["team"], "a");
    assert_eq!(find(&docs, "ClusterRoleBinding")["subjects"][0]["name"], "tq-celery-scaler");
    // Without leader election: one writer at a time, so no overlap on updates.
    let docs = render(&["leaderElection=false", "replicaCount=1"]);
    assert_eq!(find(&docs, "Deployment")["spec"]["strategy"]["type"], "Recreate");
    assert!(!kinds(&docs).contains(&"Role/ops".to_string()), "no Lease rules without election");

    // The schema: a misspelled or mistyped value fails at install, naming it.
    for (set, says) in [
        ("replicaCont=3", "replicaCont"),
        ("metricsPort=http", "metricsPort"),
        ("serviceMonitor.enable=true", "enable"),
        ("resources.limits.memroy=1Gi", "memroy"),
        ("logFormat=xml", "logFormat"),
        ("concurrency=0", "concurrency"),
        ("podPolicy.allowRoot=true", "allowRoot"),
        ("image.digest=latest", "digest"),
        ("brokerAllow={redis.celery.svc}", "brokerAllow"),
        ("serviceAccount.craete=false", "craete"),
        ("maxBrokerReply=4MB", "maxBrokerReply"),
        ("brokerTimeout=2", "brokerTimeout"),
        ("leaderElection=false", "replicaCount > 1 needs leaderElection"),
    ] {
        let out = helm_out(&["template", "tq", &chart(), "--set", set]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "--set {set}: {err}");
    }

    // The chart's appVersion is the crate's version; it ships the same CRD as crds/.
    let chart_yaml: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join("charts/taskqueue-operator/Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(chart_yaml["appVersion"], env!("CARGO_PKG_VERSION"));
    let chart_crd = std::fs::read_to_string(repo().join("charts/taskqueue-operator/crds/taskqueue.yaml")).unwrap();
    assert_eq!(chart_crd, std::fs::read_to_string(repo().join("crds/taskqueue.yaml")).unwrap());
}

/// A kubeconfig for the test API server that authenticates with `token` (a ServiceAccount's).
fn token_kubeconfig(token: &str, path: &std::path::Path) {
    let admin: Value =
        serde_yaml::from_str(&std::fs::read_to_string(std::env::var("KUBECONFIG").unwrap()).unwrap()).unwrap();
    let cluster = &admin["clusters"][0]["cluster"];
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "sa"}}],
        "current-context": "c"
    });
    std::fs::write(path, serde_yaml::to_string(&config).unwrap()).unwrap();
}

/// `kubectl ARGS` with the admin's credentials: (success, stdout).
fn kubectl(args: &[&str]) -> (bool, String) {
    let out = Command::new("kubectl").args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl auth can-i` as the ServiceAccount (asked with the admin's credentials).
fn can_i(sa: &str, verb: &str, resource: &str, ns: &str) -> bool {
    let out = Command::new("kubectl").args(["auth", "can-i", verb, resource, "-n", ns, "--as", sa]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

#[tokio::test]
#[ignore = "needs the local stack and helm: make test"]
async fn the_operator_runs_the_seed_on_the_chart_service_account_alone() {
    let client = client().await;
    ensure_crd(&client).await;
    let release_ns = namespace(&client, "helm").await;
    let work = namespace(&client, "helm-seed").await;
    let work2 = namespace(&client, "helm-two").await;
    let elsewhere = namespace(&client, "helm-not").await;
    let release = format!("tqo-{}", release_ns.trim_start_matches("helm-"));
    // --skip-crds: the CRD is installed by the other tests (and the 1.20 test server would need
    // --validate=false for its CEL rules); one namespace watched, so no test sees another's.
    helm(&[
        "install",
        &release,
        &chart(),
        "--namespace",
        &release_ns,
        "--skip-crds",
        "--wait=false",
        "--set",
        &format!("watchNamespace={work}"),
        "--set",
        &format!("watchNamespaces={{{work2}}}"),
    ]);
    // The token of the chart's ServiceAccount (the 1.20 tokens controller writes it).
    let token = wait_for("the ServiceAccount token", T, || async {
        let sa = Api::<ServiceAccount>::namespaced(client.clone(), &release_ns).get(&release).await.ok()?;
        let name = sa.secrets?.first()?.name.clone()?;
        let secret = Api::<Secret>::namespaced(client.clone(), &release_ns).get(&name).await.ok()?;
        Some(String::from_utf8(secret.data?.get("token")?.0.clone()).unwrap())
    })
    .await;
    let dir = TempDir::new("helm-sa");
    let kubeconfig = dir.0.join("kubeconfig");
    token_kubeconfig(&token, &kubeconfig);
    let log = dir.0.join("operator.log");
    let redis = Redis::start().await;
    apply_seed(&client, &work, &redis.url()).await;
    let _operator = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_taskqueue-operator"))
            .args(["run", "--namespace", &format!("{work},{work2}"), "--broker-timeout", "1s", "--metrics-addr"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg(format!("--lease-name={release}")) // as the chart's pods run it
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", &release_ns)
            .env("POD_NAME", format!("{release}-0"))
            .env("RUST_LOG", "info,kube=warn")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The seed scenario on that token alone: Deployments, routes, scaling, status, events, Lease.
    for name in ["urgent", "ai-processing", "demo-tasks", "general"] {
        wait_for(&format!("Deployment {name}"), T, || deployment(&client, &work, name)).await;
    }
    // `kubectl wait` on the Ready condition: demo-tasks (min 0, nothing pending) is ready with
    // 0/0 workers; urgent (min 1) is not, as no kubelet runs its pod here.
    assert!(kubectl(&["wait", "--for=condition=Ready", "tq/demo-tasks", "-n", &work, "--timeout=60s"]).0);
    assert!(!kubectl(&["wait", "--for=condition=Ready", "tq/urgent", "-n", &work, "--timeout=3s"]).0);
    let cm = wait_for("the routes ConfigMap", T, || routes_configmap(&client, &work)).await;
    let routes_file = dir.0.join("task_routes.json");
    std::fs::write(&routes_file, &cm).unwrap();
    celery_routed(&redis.url(), Some(&routes_file), &["register", "6"]);
    wait_replicas(&client, &work, "ai-processing", 3).await; // ceil(6 / 2)
                                                             // The status is written right after the Deployment and its Event: wait for it too.
    let tq = wait_for("ai-processing status.pending = 6", T, || async {
        Some(taskqueue(&client, &work, "ai-processing").await)
            .filter(|t| t.status.as_ref().and_then(|s| s.pending) == Some(6))
    })
    .await;
    assert_eq!(condition(&tq, "BrokerReachable").map(|c| c.0).as_deref(), Some("True"));
    assert!(!events(&client, &work, "ai-processing", "ScaledUp").await.is_empty(), "events written");
    // The second watched namespace is served on its Role alone; a third is not watched at all.
    for ns in [&work2, &elsewhere] {
        broker_secret(&client, ns, &redis.url()).await;
        create_taskqueue(&client, ns, pool("second", "secondq", json!({"minReplicas": 1}))).await;
    }
    wait_for("Deployment second in the second namespace", T, || deployment(&client, &work2, "second")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(deployment(&client, &elsewhere, "second").await.is_none(), "a namespace not watched is left alone");
    assert!(taskqueue(&client, &elsewhere, "second").await.status.is_none());
    let lease = Api::<Lease>::namespaced(client.clone(), &release_ns).get(&release).await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity, Some(format!("{release}-0")));
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(!logs.to_lowercase().contains("forbidden"), "{logs}");
    // What a person sees: `kubectl get tq -o wide` and `taskqueue-operator status`.
    let (ok, wide) = kubectl(&["get", "tq", "-n", &work, "-o", "wide"]);
    assert!(ok && wide.contains("IN-FLIGHT") && wide.contains("LAST-SCALE"), "{wide}");
    let ai = wide.lines().find(|l| l.starts_with("ai-processing")).unwrap();
    assert!(ai.contains("scaled up"), "{ai}");
    let status = Command::new(env!("CARGO_BIN_EXE_taskqueue-operator")).args(["status", "-n", &work]).output().unwrap();
    let status = String::from_utf8(status.stdout).unwrap();
    let line = status.lines().find(|l| l.starts_with("ai-processing")).unwrap();
    assert!(line.contains("3/0") && line.contains("Ready=False(WorkersNotReady)"), "{status}");
    let ns_free = |t: &str| t.replace(&work, "NS");
    support::docs::checked(
        "docs/install.md",
        "seed",
        &format!(
            "```\n$ kubectl get tq -o wide\n{}\n$ taskqueue-operator status\n{}```\n",
            ns_free(wide.trim_end()),
            ns_free(&status)
        ),
        without_ages,
    );

    // And no more than that.
    let sa = format!("system:serviceaccount:{release_ns}:{release}");
    assert!(can_i(&sa, "get", "secrets", &work) && can_i(&sa, "get", "secrets", &work2), "Secrets by name");
    for (verb, resource, ns) in [
        ("list", "secrets", work.as_str()),
        ("watch", "secrets", work.as_str()),
        ("delete", "deployments", work.as_str()),
        ("create", "pods", work.as_str()),
        ("get", "secrets", "kube-system"),
        ("get", "secrets", elsewhere.as_str()),
        ("patch", "configmaps", elsewhere.as_str()),
        ("list", "deployments", "default"),
        ("create", "leases", work.as_str()),
    ] {
        assert!(!can_i(&sa, verb, resource, ns), "{sa} may {verb} {resource} in {ns}");
    }

    helm(&["uninstall", &release, "--namespace", &release_ns]);
    for ns in [&work, &work2, &elsewhere] {
        delete_namespace(&client, ns).await;
    }
    delete_namespace(&client, &release_ns).await;
}

/// Sample names the operator exports: from the `# TYPE` lines of its own exposition (a counter
/// `x` is sampled as `x_total`, a histogram as `x_bucket`, `x_sum`, `x_count`).
fn exported_metrics() -> Vec<String> {
    let text = taskqueue_operator::metrics::Metrics::example().render();
    let mut names = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind {
            "counter" => names.push(format!("{name}_total")),
            "histogram" => names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}"))),
            _ => names.push(name.to_string()),
        }
    }
    names
}

/// The `taskqueue_*` metric names in a PromQL expression.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("taskqueue_") {
        let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out
}

#[test]
#[ignore = "needs helm: make test"]
fn the_grafana_dashboard_and_the_alerts_query_only_metrics_the_operator_exports() {
    let exported = exported_metrics();
    assert!(exported.contains(&"taskqueue_not_ok".to_string()) && exported.len() > 10, "{exported:?}");
    assert!(render(&[]).iter().all(|d| d["kind"] != "PrometheusRule"), "off by default");
    let docs = render(&["grafana.dashboard.enabled=true", "prometheusRule.enabled=true"]);

    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"] == "1");
    let cm = cm.unwrap_or_else(|| panic!("no ConfigMap labelled for the Grafana sidecar in {:?}", kinds(&docs)));
    let json = cm["data"]["taskqueue-operator.json"].as_str().unwrap();
    let dashboard: Value = serde_json::from_str(json).expect("the dashboard is valid JSON");
    let mut exprs = Vec::new();
    let mut stack = vec![&dashboard];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    exprs.push(e.clone());
                }
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    assert!(exprs.len() >= 10, "every panel queries something: {exprs:?}");

    let rule = find(&docs, "PrometheusRule");
    let alerts: Vec<(String, String)> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["alert"].as_str().unwrap().to_string(), r["expr"].as_str().unwrap().to_string()))
        .collect();
    let names: Vec<&str> = alerts.iter().map(|(a, _)| a.as_str()).collect();
    for want in [
        "TaskQueueBrokerUnreadable",
        "TaskQueueAtMaxReplicas",
        "TaskQueueNoReadyWorkers",
        "TaskQueueRoutesNotAccepted",
        "TaskQueueSpecInvalid",
        "TaskQueueOperatorNotLeading",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    exprs.extend(alerts.into_iter().map(|(_, e)| e));
    for expr in &exprs {
        let used = metrics_in(expr);
        assert!(!used.is_empty(), "{expr} queries no taskqueue_ metric");
        for m in used {
            assert!(exported.contains(&m), "{expr}: {m} is not exported (exported: {exported:?})");
        }
    }
}

/// Prometheus's target labels for a scrape through a ServiceMonitor endpoint (the
/// prometheus-operator's relabelling: job = the Service's name, namespace = its namespace, and
/// service, pod, container, endpoint), merged with a scraped series' labels as Prometheus does:
/// with `honor_labels` the scraped ones win; without, a scraped label that clashes is renamed
/// `exported_<name>` and the target's value takes its place.
fn as_prometheus_stores(scraped: &[(String, String)], target: &[(&str, &str)], honor: bool) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in scraped {
        let clash = target.iter().any(|(t, _)| t == k);
        let name = if clash && !honor { format!("exported_{k}") } else { k.clone() };
        out.push((name, v.clone()));
    }
    for (k, v) in target {
        if !(honor && scraped.iter().any(|(s, _)| s == k)) {
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

/// `name{a="x",b="y"} 1` -> (name, [(a, x), (b, y)]).
fn parse_series(line: &str) -> (String, Vec<(String, String)>) {
    let (head, _) = line.rsplit_once(' ').unwrap();
    let Some((name, labels)) = head.split_once('{') else { return (head.to_string(), Vec::new()) };
    let labels = labels.trim_end_matches('}');
    let pairs = labels
        .split("\",")
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once("=\"").unwrap();
            (k.to_string(), v.trim_end_matches('"').to_string())
        })
        .collect();
    (name.to_string(), pairs)
}

#[test]
#[ignore = "needs helm: make test"]
fn alerts_and_panels_see_each_taskqueue_under_its_own_namespace_as_prometheus_stores_it() {
    let docs = render(&["serviceMonitor.enabled=true", "prometheusRule.enabled=true"]);
    let monitor = find(&docs, "ServiceMonitor");
    let endpoint = &monitor["spec"]["endpoints"][0];
    let honor = endpoint["honorLabels"] == true;
    let service = find(&docs, "Service")["metadata"]["name"].as_str().unwrap().to_string();
    let target = [
        ("job", service.as_str()),
        ("namespace", "ops"),
        ("service", service.as_str()),
        ("pod", "tq-5d8f-abcde"),
        ("container", "operator"),
        ("endpoint", "metrics"),
    ];
    let text = taskqueue_operator::metrics::Metrics::example().render();
    let stored: Vec<(String, Vec<(String, String)>)> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(parse_series)
        .map(|(n, l)| (n, as_prometheus_stores(&l, &target, honor)))
        .collect();
    let get = |labels: &[(String, String)], k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let pending = &stored.iter().find(|(n, _)| n == "taskqueue_pending").unwrap().1;
    assert_eq!(
        (get(pending, "namespace"), get(pending, "exported_namespace")),
        (Some("prod".to_string()), None),
        "a TaskQueue's series keeps its own namespace (honorLabels): {pending:?}"
    );
    // The leader alert selects the operator's own series by the labels Prometheus gives them.
    let leader = &stored.iter().find(|(n, _)| n == "taskqueue_leader").unwrap().1;
    let rule = find(&docs, "PrometheusRule");
    let expr = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["alert"] == "TaskQueueOperatorNotLeading")
        .unwrap()["expr"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(expr.contains("absent(taskqueue_leader{"), "fires with no operator scraped at all: {expr}");
    for selector in expr.match_indices("taskqueue_leader{").map(|(i, _)| &expr[i + 17..]) {
        let selector = &selector[..selector.find('}').unwrap()];
        for m in selector.split(", ") {
            let (k, v) = m.split_once("=").unwrap();
            assert_eq!(get(leader, k), Some(v.trim_matches('"').to_string()), "{k} in {expr} vs {leader:?}");
        }
    }
}

/// The TaskQueue CRD as JSON under another group (so this test's upgrade does not touch the CRD
/// the other tests share), without `spec.worker.commandPrefix` when `old`: a CRD from before
/// that field.
fn crd_in_group(group: &str, old: bool) -> Value {
    let mut crd = serde_json::to_value(taskqueue_operator::crd::crd()).unwrap();
    crd["metadata"]["name"] = json!(format!("taskqueues.{group}"));
    crd["spec"]["group"] = json!(group);
    if old {
        let worker =
            crd.pointer_mut("/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/worker/properties");
        worker.unwrap().as_object_mut().unwrap().remove("commandPrefix").expect("the field exists today");
    }
    crd
}

/// Helm installs `crds/` once and never upgrades it; an API server with the old schema prunes a
/// field it does not know, silently. The documented path (README, "Upgrading"): apply the chart's
/// CRD with `kubectl apply -f` before `helm upgrade`. Shown on the real API server:
/// with the old CRD a new field is dropped; after applying the new CRD the same write keeps it,
/// and the objects written before are still there.
#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn an_old_crd_prunes_a_new_field_and_applying_the_chart_crd_first_keeps_it() {
    use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
    use kube::core::GroupVersionKind;
    let client = client().await;
    let group = "upgrade-test.taskqueue.dev";
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    let name = format!("taskqueues.{group}");
    let dir = TempDir::new("crd-upgrade");
    // As the README says to: `kubectl apply -f` the chart's CRD, with `--validate=false` as on
    // any server before 1.23 (this one is 1.20: kubectl's own schema check does not know the CEL
    // rules, and the server drops them).
    let apply = |old: bool| {
        let (crds, name) = (crds.clone(), name.clone());
        let file = dir.0.join(if old { "old.json" } else { "new.json" });
        async move {
            std::fs::write(&file, crd_in_group(group, old).to_string()).unwrap();
            let (ok, out) = kubectl(&["apply", "--validate=false", "-f", file.to_str().unwrap()]);
            assert!(ok, "kubectl apply: {out}");
            wait_for("the CRD to serve its schema", Duration::from_secs(30), || async {
                let c = crds.get(&name).await.ok()?;
                let ok = c.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True");
                ok.then_some(())
            })
            .await;
        }
    };
    apply(true).await;
    let ns = namespace(&client, "crd-upgrade").await;
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, "v1alpha1", "TaskQueue"));
    let tqs: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    let mut tq = pool("wrapped", "wrapped", json!({}));
    tq["apiVersion"] = json!(format!("{group}/v1alpha1"));
    tq["spec"]["worker"]["commandPrefix"] = json!(["ddtrace-run"]);
    let obj: DynamicObject = serde_json::from_value(tq.clone()).unwrap();
    // The schema changes take a moment to reach the API server's handlers: write until the
    // outcome is the old schema's (pruned) or, later, the new one's (kept).
    let written = |want_kept: bool| {
        let (tqs, obj) = (tqs.clone(), obj.clone());
        async move {
            wait_for("the write under the expected schema", Duration::from_secs(30), || async {
                let pp = PatchParams::apply("upgrade-test").force();
                let got = tqs.patch("wrapped", &pp, &Patch::Apply(&obj)).await.ok()?;
                let kept = got.data["spec"]["worker"].get("commandPrefix").is_some();
                (kept == want_kept).then_some(got)
            })
            .await
        }
    };
    written(false).await;
    println!("with the old CRD: spec.worker.commandPrefix written, read back: absent (pruned)");
    apply(false).await;
    let got = written(true).await;
    assert_eq!(got.data["spec"]["worker"]["commandPrefix"], json!(["ddtrace-run"]));
    println!("after `kubectl apply -f` of the chart's CRD: kept");
    delete_namespace(&client, &ns).await;
    crds.delete(&name, &Default::default()).await.unwrap();
}
