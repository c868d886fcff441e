//! A modern (1.36-line) API server from `../shared/tools/modern-apiserver.sh`, for what the
//! 1.20 test API server cannot check: CEL rules, strict field validation.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The tool, when this checkout sits beside `../shared` (the team's machines); None elsewhere.
pub fn script() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/modern-apiserver.sh");
    p.exists().then_some(p)
}

/// The API server started by `modern-apiserver.sh up`; dropping it runs `down`, also when the
/// test panics.
pub struct ModernApiServer {
    script: PathBuf,
    state: PathBuf,
    ports: [u16; 3],
}

impl ModernApiServer {
    pub fn start(script: PathBuf) -> Self {
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

    pub async fn client(&self) -> Client {
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

/// Server-side apply of `crd::crd()`, then wait until it is Established.
pub async fn install_crd(client: &Client) {
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
