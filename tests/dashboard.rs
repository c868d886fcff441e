//! The live page in a real headless Chromium (Debian's `chromium`, driven over the DevTools
//! protocol) while the seed scenario runs on the real API server with real Celery producers:
//! every TaskQueue is shown with the numbers of its status, the charts are drawn, a screenshot
//! is saved, and the same page (not reloaded) shows the new numbers after a scale change.
//! `/api/taskqueues` is checked against the statuses too.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::{json, Value};
use support::*;
use taskqueue_operator::crd::TaskQueue;
use taskqueue_operator::dashboard::Dashboard;
use taskqueue_operator::metrics::Metrics;
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Headless Chromium with one page, driven over the DevTools protocol; killed on drop.
struct Browser {
    _process: Process,
    page: Socket,
    next_id: u64,
}

/// The Chromium process and its profile, removed on drop (also when a test step panics).
struct Process(Child, std::path::PathBuf);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// A GET over plain HTTP/1.1 (async: the operator's server runs on this test's runtime). The
/// body is read to its Content-Length: Chromium's DevTools server keeps the connection open.
async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // Chromium builds the page's websocket address from the Host header: it needs the port.
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok());
            if length.is_some_and(|n| body.len() >= n) {
                return body.to_string();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk)).await.expect("HTTP answer").unwrap();
        if n == 0 {
            return String::from_utf8_lossy(&buf)
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl Browser {
    async fn launch(bin: &str) -> Self {
        let profile = std::env::temp_dir().join(format!("tq-chromium-{}", std::process::id()));
        let child = Command::new(bin)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
            .args(["--disable-crash-reporter", "--disable-breakpad"])
            .args(["--remote-debugging-port=0", "--remote-allow-origins=*", "--window-size=1500,900"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin}: {e}"));
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"; keep draining stderr.
        let (tx, rx) = std::sync::mpsc::channel();
        let mut process = Process(child, profile);
        let stderr = process.0.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split_once("DevTools listening on ").map(|(_, u)| u.trim().to_string()) {
                    let _ = tx.send(url);
                }
            }
        });
        let browser_url = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .unwrap()
            .expect("chromium prints its DevTools address");
        let port: u16 = browser_url.split(':').nth(2).unwrap().split('/').next().unwrap().parse().unwrap();
        let targets: Value = serde_json::from_str(&http_get(port, "/json/list").await).unwrap();
        let page_url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            // Chromium listens on 127.0.0.1 only; "localhost" may resolve to ::1 first.
            .replace("ws://localhost:", "ws://127.0.0.1:");
        let (page, _) = tokio_tungstenite::connect_async(&page_url)
            .await
            .unwrap_or_else(|e| panic!("DevTools websocket {page_url}: {e}"));
        Browser { _process: process, page, next_id: 0 }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.page.send(Message::text(msg)).await.unwrap();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), self.page.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("DevTools connection open")
                .unwrap();
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// A JavaScript expression's value (JSON-serializable).
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true})).await;
        r["result"]["value"].clone()
    }

    async fn screenshot(&mut self, path: &std::path::Path) {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", json!({"format": "png", "captureBeyondViewport": true})).await;
        let png = base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, png).unwrap();
    }
}

/// What the page shows, read from its DOM.
const READ_PAGE: &str = r#"JSON.stringify({
  updates: Number(document.body.dataset.updates || 0),
  role: document.getElementById("role").textContent,
  rows: [...document.querySelectorAll("tr[data-tq]")].map((tr) => ({
    tq: tr.dataset.tq, state: tr.dataset.state,
    pending: tr.querySelector("td.pending").textContent,
    desired: tr.querySelector("td.desired").textContent,
    ready: tr.querySelector("td.ready").textContent,
    samples: Number(tr.querySelector("svg.chart").dataset.samples),
    lines: tr.querySelectorAll("svg.chart polyline").length,
    marks: tr.querySelectorAll("svg.chart g title").length,
  })),
})"#;

/// (pending, desired, ready) of every TaskQueue as its status says, as the page prints them.
async fn statuses(client: &Client, ns: &str) -> BTreeMap<String, (String, String, String)> {
    let tqs = Api::<TaskQueue>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap().items;
    let show = |n: Option<i64>| n.map_or("–".to_string(), |n| n.to_string());
    tqs.iter()
        .map(|t| {
            let s = t.status.clone().unwrap_or_default();
            let key = format!("{ns}/{}", t.metadata.name.as_deref().unwrap());
            (key, (show(s.pending), show(s.desired_replicas.map(i64::from)), show(s.ready_replicas.map(i64::from))))
        })
        .collect()
}

fn shown(page: &Value) -> BTreeMap<String, (String, String, String)> {
    page["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap().to_string();
            (s("tq"), (s("pending"), s("desired"), s("ready")))
        })
        .collect()
}

/// The page, once it shows what the statuses say and `ready(page)` holds.
async fn page_matching(
    b: &mut Browser,
    client: &Client,
    ns: &str,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = (Value::Null, BTreeMap::new());
    for _ in 0..90 {
        // Not a string while the page is still loading (the script throws).
        let Some(text) = b.eval(READ_PAGE).await.as_str().map(String::from) else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let page: Value = serde_json::from_str(&text).unwrap();
        let want = statuses(client, ns).await;
        if shown(&page) == want && ready(&page) {
            return page;
        }
        last = (page, want);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("the page never showed {what} as the statuses say:\n page {}\n status {:?}", last.0, last.1);
}

fn row<'a>(page: &'a Value, tq: &str) -> &'a Value {
    page["rows"].as_array().unwrap().iter().find(|r| r["tq"] == tq).unwrap_or_else(|| panic!("{tq} in {page}"))
}

#[tokio::test]
#[ignore = "needs the local stack and chromium: make test"]
async fn the_live_page_shows_every_taskqueue_as_its_status_and_follows_a_scale_change() {
    let chromium = std::env::var("TQ_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    if Command::new(&chromium).arg("--version").output().is_err() {
        skipped(
            "the_live_page_shows_every_taskqueue_as_its_status_and_follows_a_scale_change",
            &format!("no {chromium} (deploy/local/deps.sh installs it)"),
        );
        return;
    }
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "page").await;
    let redis = Redis::start().await;
    apply_seed(&client, &ns, &redis.url()).await;

    // The operator and its HTTP server, as `taskqueue-operator run` wires them.
    let (metrics, dashboard) = (Arc::new(Metrics::new()), Arc::new(Dashboard::default()));
    let operator = Operator::start_with(&client, &ns, |s| {
        s.metrics = metrics.clone();
        s.dashboard = dashboard.clone();
    });
    let listener = taskqueue_operator::http::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(taskqueue_operator::http::serve(listener, metrics, dashboard));
    for name in ["urgent", "ai-processing", "demo-tasks", "general"] {
        wait_for(&format!("Deployment {name}"), T, || deployment(&client, &ns, name)).await;
    }

    let cm = wait_for("ConfigMap celery-task-routes", T, || routes_configmap(&client, &ns)).await;
    let routes_file = std::env::temp_dir().join(format!("{ns}-task_routes.json"));
    std::fs::write(&routes_file, &cm).unwrap();
    // 6 x register_user: 12 demo_tasks messages (3 replicas), 6 ai_processing (3 replicas).
    celery_routed(&redis.url(), Some(&routes_file), &["register", "6"]);

    eprintln!("dashboard test: launching chromium");
    let mut b = Browser::launch(&chromium).await;
    eprintln!("dashboard test: chromium up");
    b.call("Page.enable", json!({})).await;
    b.call("Page.navigate", json!({"url": format!("http://127.0.0.1:{port}/?namespace={ns}")})).await;
    eprintln!("dashboard test: page opened");
    let ai = format!("{ns}/ai-processing");
    let first = page_matching(&mut b, &client, &ns, "6 ai_processing tasks", |p| {
        row(p, &ai)["pending"] == "6" && row(p, &ai)["desired"] == "3"
    })
    .await;
    eprintln!("dashboard test: first reading matched");
    assert_eq!(first["role"], "leader");
    assert_eq!(first["rows"].as_array().unwrap().len(), 4, "every TaskQueue of the namespace: {first}");
    for r in first["rows"].as_array().unwrap() {
        assert!(r["samples"].as_u64().unwrap() >= 1 && r["lines"].as_u64().unwrap() == 4, "a chart per row: {r}");
    }
    assert_eq!(first["rows"][0]["pending"], "12", "most work waiting first (demo-tasks): {first}");

    // /api/taskqueues says what the statuses say.
    let api: Value = serde_json::from_str(&http_get(port, &format!("/api/taskqueues?namespace={ns}")).await).unwrap();
    let from_api: BTreeMap<String, (String, String, String)> = api["taskQueues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let n = |k: &str| t[k].as_i64().map_or("–".to_string(), |n| n.to_string());
            (
                format!("{}/{}", t["namespace"].as_str().unwrap(), t["name"].as_str().unwrap()),
                (n("pending"), n("desiredReplicas"), n("readyReplicas")),
            )
        })
        .collect();
    assert_eq!(from_api, statuses(&client, &ns).await, "/api/taskqueues");
    assert!(!api.to_string().contains("redis://"), "no broker address (it may carry a password)");

    eprintln!("dashboard test: api matched");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    b.screenshot(&shot).await;
    println!("dashboard screenshot: {}", shot.display());

    // The same page, not reloaded, follows a scale change: 12 ai_processing tasks -> 6 replicas.
    celery_routed(&redis.url(), Some(&routes_file), &["register", "6"]);
    let second = page_matching(&mut b, &client, &ns, "12 ai_processing tasks", |p| {
        row(p, &ai)["pending"] == "12" && row(p, &ai)["desired"] == "6"
    })
    .await;
    assert!(second["updates"].as_u64() > first["updates"].as_u64(), "the page refreshed itself");
    let (before, after) = (row(&first, &ai), row(&second, &ai));
    assert!(after["samples"].as_u64() > before["samples"].as_u64(), "the chart grew: {before} -> {after}");
    assert!(after["marks"].as_u64().unwrap() >= 2, "both scale-ups are marked: {after}");
    let shot2 = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-after-scale.png");
    b.screenshot(&shot2).await;
    println!("dashboard screenshot after the scale change: {}", shot2.display());

    drop(b);
    server.abort();
    operator.stop().await;
    delete_namespace(&client, &ns).await;
}
