//! The Helm chart with a real Helm binary: lint, render, install into the real API server.

mod support;

use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::Api;
use support::*;

fn helm(args: &[&str]) -> String {
    let out = Command::new("helm").args(args).output().expect("helm on PATH (deploy/local/helm.sh fetches it)");
    assert!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
#[ignore = "needs helm: make test"]
fn chart_lints_and_renders_the_operator_with_least_privilege_rbac() {
    let chart = repo().join("charts/taskqueue-operator");
    let chart = chart.to_str().unwrap();
    helm(&["lint", "--strict", chart]);
    let rendered = helm(&["template", "tq", chart, "--namespace", "ops", "--set", "watchNamespace=prod"]);
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"]);
    let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["args"],
        serde_json::json!(["run", "--metrics-addr", "0.0.0.0:8080", "--namespace", "prod"])
    );
    let role = docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let secrets =
        role["rules"].as_array().unwrap().iter().find(|r| r["resources"] == serde_json::json!(["secrets"])).unwrap();
    assert_eq!(secrets["verbs"], serde_json::json!(["get"]), "Secrets are read one by one, never listed");
    // The chart ships the same CRD as crds/ (crd.rs also checks this against the Rust types).
    let chart_crd = std::fs::read_to_string(repo().join("charts/taskqueue-operator/crds/taskqueue.yaml")).unwrap();
    assert_eq!(chart_crd, std::fs::read_to_string(repo().join("crds/taskqueue.yaml")).unwrap());
}

#[tokio::test]
#[ignore = "needs the local stack and helm: make test"]
async fn chart_installs_into_a_real_api_server() {
    let client = client().await;
    let ns = namespace(&client, "helm").await;
    let release = format!("tqo-{}", &ns[5..]);
    let chart = repo().join("charts/taskqueue-operator");
    // --skip-crds: the CRD is installed by the other tests (and the 1.20 test server would
    // need --validate=false for its CEL rules); this checks the chart's own objects.
    helm(&["install", &release, chart.to_str().unwrap(), "--namespace", &ns, "--skip-crds", "--wait=false"]);
    let d =
        Api::<Deployment>::namespaced(client.clone(), &ns).get(&release).await.expect("operator Deployment installed");
    assert_eq!(d.spec.unwrap().template.spec.unwrap().service_account_name.as_deref(), Some(release.as_str()));
    Api::<ClusterRole>::all(client.clone()).get(&release).await.expect("ClusterRole installed");
    helm(&["uninstall", &release, "--namespace", &ns]);
    delete_namespace(&client, &ns).await;
}
