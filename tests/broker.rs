//! Broker reading against a real redis-server: kombu's key layout, error classification,
//! connection reuse, and one pipelined round trip per broker per tick.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::reflector::ObjectRef;
use support::{ChildGuard, Redis, Sentinel, TempDir};
use taskqueue_operator::broker::pool::open_client;
use taskqueue_operator::broker::reader::read_depths;
use taskqueue_operator::broker::resp::Limits;
use taskqueue_operator::broker::{BrokerEndpoint, BrokerPool, DepthQuery, ReadError};
use taskqueue_operator::controller::orphans::ORPHAN_GRACE;
use taskqueue_operator::controller::poller::{BrokerState, Target};
use taskqueue_operator::crd::{TaskQueue, TransportOptions};

/// The test's own connection, with no reply timeout: a 30 000-entry transaction on a loaded
/// 2-core machine takes longer than redis-rs's default (CI saw it time out).
async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(url).unwrap().get_multiplexed_async_connection_with_config(&config).await.unwrap()
}

async fn lpush(c: &mut redis::aio::MultiplexedConnection, key: &[u8], n: usize) {
    for i in 0..n {
        let _: () = redis::cmd("LPUSH").arg(key).arg(format!("m{i}")).query_async(c).await.unwrap();
    }
}

/// A TaskQueue reading one queue of `url`, polled every second (no pool judged for orphans).
fn target_on(url: &str, queue: &str) -> Target {
    Target {
        endpoint: endpoint(url),
        queries: vec![DepthQuery::new(queue, &TransportOptions::default())],
        interval: Duration::from_secs(1),
        weight: 10,
        pool: String::new(),
    }
}

fn endpoint(url: &str) -> BrokerEndpoint {
    BrokerEndpoint::parse(url).unwrap()
}

#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn depth_sums_every_priority_list_and_flags_foreign_key_types() {
    let redis = Redis::start().await;
    let mut c = raw(&redis.url()).await;
    lpush(&mut c, b"alpha", 5).await;
    lpush(&mut c, b"alpha\x06\x163", 2).await;
    lpush(&mut c, b"alpha\x06\x169", 1).await;
    lpush(&mut c, b"pfx:beta:5", 4).await; // custom prefix/sep/steps
    let _: () = redis::cmd("SET").arg("gamma").arg("not a list").query_async(&mut c).await.unwrap();

    let custom = TransportOptions {
        global_keyprefix: "pfx:".into(),
        priority_steps: vec![0, 5],
        sep: ":".into(),
        ..TransportOptions::default()
    };
    let queries = vec![
        DepthQuery::new("alpha", &TransportOptions::default()),
        DepthQuery::new("beta", &custom),
        DepthQuery::new("gamma", &TransportOptions::default()),
        DepthQuery::new("missing", &TransportOptions::default()),
    ];
    let mut conn = BrokerPool::default().connection(&endpoint(&redis.url())).await.unwrap();
    let got = read_depths(&mut conn, "test", &queries).await.unwrap();
    let alpha = got[0].as_ref().unwrap();
    assert_eq!(alpha.pending, 8);
    assert_eq!(alpha.by_priority.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), [(0, 5), (3, 2), (6, 0), (9, 1)]);
    assert_eq!(got[1].as_ref().unwrap().pending, 4);
    match &got[2] {
        Err(ReadError::WrongType { key, .. }) => assert_eq!(key, "gamma"),
        other => panic!("expected WrongType for gamma, got {other:?}"),
    }
    assert_eq!(got[3].as_ref().unwrap().pending, 0, "a queue without keys is empty, not an error");
}

#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn unreachable_and_auth_failures_are_told_apart_without_leaking_the_password() {
    // Nothing listens on a fresh free port.
    let down = format!("redis://:hunter2@127.0.0.1:{}/0", support::free_port());
    let err = BrokerPool::new(Duration::from_secs(1)).connection(&endpoint(&down)).await.unwrap_err();
    assert_eq!(err.reason(), "BrokerUnreachable", "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");

    let redis = Redis::start().await;
    let mut c = raw(&redis.url()).await;
    let _: () = redis::cmd("CONFIG").arg("SET").arg("requirepass").arg("s3cret").query_async(&mut c).await.unwrap();
    for url in [redis.url(), format!("redis://:hunter2@127.0.0.1:{}/0", redis.port)] {
        let pool = BrokerPool::new(Duration::from_secs(1));
        let err = match pool.connection(&endpoint(&url)).await {
            Err(e) => e,
            Ok(mut conn) => {
                read_depths(&mut conn, "test", &[DepthQuery::new("q", &TransportOptions::default())]).await.unwrap_err()
            }
        };
        assert_eq!(err.reason(), "BrokerAuthFailed", "{url}: {err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
    let ok = format!("redis://:s3cret@127.0.0.1:{}/0", redis.port);
    let mut conn = BrokerPool::default().connection(&endpoint(&ok)).await.unwrap();
    assert!(read_depths(&mut conn, "test", &[DepthQuery::new("q", &TransportOptions::default())]).await.is_ok());
}

#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn one_round_trip_per_broker_per_tick_on_one_reused_connection() {
    let (a, b) = (Redis::start().await, Redis::start().await);
    let mut ca = raw(&a.url()).await;
    lpush(&mut ca, b"ai_processing", 3).await;
    lpush(&mut ca, b"demo_tasks\x06\x166", 7).await;
    let state = Arc::new(BrokerState::new(Duration::from_secs(1)));
    let opts = TransportOptions::default();
    let key = |n: &str| ObjectRef::<TaskQueue>::new(n).within("ns");
    let target = |url: &str, queues: &[&str]| Target {
        endpoint: endpoint(url),
        queries: queues.iter().map(|q| DepthQuery::new(q, &opts)).collect(),
        interval: Duration::from_millis(100),
        weight: 10,
        pool: String::new(),
    };
    // Three TaskQueues on broker a (two share a queue), one on broker b.
    state.register(key("ai"), target(&a.url(), &["ai_processing"]));
    state.register(key("demo"), target(&a.url(), &["demo_tasks"]));
    state.register(key("both"), target(&a.url(), &["ai_processing", "demo_tasks"]));
    state.register(key("other"), target(&b.url(), &["celery"]));

    let conns_before = total_connections(&mut ca).await;
    let (ea, eb) = (endpoint(&a.url()), endpoint(&b.url()));
    let (changed_a, ok_a) = state.read_endpoint(&ea).await;
    let (changed_b, ok_b) = state.read_endpoint(&eb).await;
    assert!(ok_a && ok_b);
    assert_eq!(changed_a.len() + changed_b.len(), 4, "first reading of every TaskQueue is a change");
    assert_eq!(state.round_trips.load(std::sync::atomic::Ordering::Relaxed), 2, "one per broker");
    let both = state.reading(&key("both")).unwrap().depths.unwrap();
    assert_eq!(both.iter().map(|d| d.as_ref().unwrap().pending).collect::<Vec<_>>(), [3, 7]);
    // Who shares what, per namespace and broker: ai_processing is the spec.queue of ai and of
    // both; demo_tasks is demo's, and both only lists it in extraQueues.
    let shares = state.reading(&key("both")).unwrap().shares;
    assert_eq!(shares[0].others(), "ai (spec.queue)");
    assert_eq!((shares[0].part(3), shares[1].part(7)), (1, 0), "ai (first by name) takes the odd one of 3");
    assert!(!state.reading(&key("other")).unwrap().shares[0].is_shared(), "another broker is another queue");

    // Read again: one more round trip per broker each time, nothing changed, nobody woken; the
    // reading's time is still the latest read's (a rotated Secret is judged by it).
    let first_at = state.reading(&key("ai")).unwrap().at;
    for _ in 1..=5 {
        let before = std::time::Instant::now();
        let (changed_a, _) = state.read_endpoint(&ea).await;
        let (changed_b, _) = state.read_endpoint(&eb).await;
        assert!(changed_a.is_empty() && changed_b.is_empty(), "same depths: no reconcile wake-ups");
        let at = state.reading(&key("ai")).unwrap().at;
        assert!(at >= before && at > first_at, "a quiet read still dates the reading");
    }
    assert_eq!(state.round_trips.load(std::sync::atomic::Ordering::Relaxed), 12);
    // The pool dialled broker a once for all of that, plus one heartbeat subscription.
    state.sync_heartbeats();
    support::wait_for("the heartbeat subscription on broker a", Duration::from_secs(10), || {
        let mut ca = ca.clone();
        async move {
            let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut ca).await.unwrap();
            list.lines().any(|l| l.contains(" sub=5 ")).then_some(())
        }
    })
    .await;
    assert_eq!(total_connections(&mut ca).await - conns_before, 2);
    assert_eq!(state.connections().await, 2, "one pooled connection per broker");

    lpush(&mut ca, b"ai_processing", 1).await;
    let (mut changed, _) = state.read_endpoint(&ea).await;
    changed.sort_by_key(|k| k.name.clone());
    assert_eq!(changed, [key("ai"), key("both")], "only the TaskQueues whose depth moved are woken");
    // A new consumer of a queue changes the others' shares: they are woken though no depth moved.
    state.register(key("late"), target(&a.url(), &["demo_tasks"]));
    let (mut changed, _) = state.read_endpoint(&ea).await;
    changed.sort_by_key(|k| k.name.clone());
    assert_eq!(changed, [key("both"), key("demo"), key("late")]);
}

async fn total_connections(c: &mut redis::aio::MultiplexedConnection) -> i64 {
    let info: String = redis::cmd("INFO").arg("stats").query_async(c).await.unwrap();
    info.lines().find_map(|l| l.strip_prefix("total_connections_received:")).unwrap().trim().parse().unwrap()
}

/// Run `openssl ARGS...` in `dir`, quietly.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let status = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "openssl {args:?}");
}

/// A throwaway CA in `dir`: `<name>.pem` (certificate) and `<name>.key`.
fn make_ca(dir: &std::path::Path, name: &str) {
    let (key, pem, subj) = (format!("{name}.key"), format!("{name}.pem"), format!("/CN=taskqueue test {name}"));
    openssl(
        dir,
        &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", &subj, "-keyout", &key, "-out", &pem],
    );
}

/// A redis-server serving TLS only, with `cert.pem`/`key.pem` from `dir`; returns the TLS port.
async fn tls_redis(dir: &std::path::Path) -> (ChildGuard, u16) {
    let port = support::free_port();
    let server = ChildGuard(
        std::process::Command::new(std::env::var("TQ_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()))
            .args(["--port", "0", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
            .arg("--tls-cert-file")
            .arg(dir.join("cert.pem"))
            .arg("--tls-key-file")
            .arg(dir.join("key.pem"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    support::wait_for("TLS port open", Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    })
    .await;
    (server, port)
}

/// The error of one depth read through a fresh pool (connecting or reading), or the pending count.
async fn read_once(endpoint: &BrokerEndpoint) -> Result<i64, ReadError> {
    let pool = BrokerPool::new(Duration::from_secs(2));
    let mut conn = pool.connection(endpoint).await?;
    let got = read_depths(&mut conn, "test", &[DepthQuery::new("q", &TransportOptions::default())]).await?;
    Ok(got[0].as_ref().unwrap().pending)
}

#[tokio::test]
#[ignore = "needs redis-server and openssl: make test"]
async fn rediss_verifies_the_server_certificate_unless_the_url_opts_out() {
    let tmp = TempDir::new(&format!("tq-tls-{}", support::free_port()));
    let dir = tmp.0.clone();
    // A private CA signs the server's certificate; another CA has nothing to do with it.
    make_ca(&dir, "ca");
    make_ca(&dir, "other-ca");
    std::fs::write(dir.join("san.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        &dir,
        &["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "key.pem", "-out", "cert.csr"],
    );
    let sign = ["x509", "-req", "-in", "cert.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"];
    openssl(&dir, &[&sign[..], &["-days", "1", "-extfile", "san.cnf", "-out", "cert.pem"]].concat());
    let (_server, port) = tls_redis(&dir).await;
    let url = format!("rediss://127.0.0.1:{port}/0");
    let with_ca = |file: &str| {
        let pem = std::fs::read(dir.join(file)).unwrap();
        BrokerEndpoint::resolve(&url, None, Some(pem)).unwrap()
    };

    // A certificate from a private CA is not trusted by the system roots: the read fails
    // instead of silently connecting.
    let refused = read_once(&endpoint(&url)).await.unwrap_err();
    assert!(refused.to_string().contains("certificate") && refused.to_string().contains("caSecretRef"), "{refused}");
    // The CA from spec.broker.caSecretRef makes it verifiable ...
    assert_eq!(read_once(&with_ca("ca.pem")).await.unwrap(), 0);
    // ... and only that CA: another one is refused like the system roots.
    let refused = read_once(&with_ca("other-ca.pem")).await.unwrap_err();
    assert!(refused.to_string().contains("not signed by the CA bundle in spec.broker.caSecretRef"), "{refused}");
    // A Secret key holding something else is named as the culprit.
    for junk in [&b"not a certificate"[..], b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n"] {
        let bad = BrokerEndpoint::resolve(&url, None, Some(junk.to_vec())).unwrap();
        let err = read_once(&bad).await.unwrap_err();
        assert!(err.to_string().contains("spec.broker.caSecretRef"), "{err}");
    }
    // Celery's explicit opt-out is honoured.
    assert_eq!(read_once(&endpoint(&format!("{url}?ssl_cert_reqs=CERT_NONE"))).await.unwrap(), 0);
}

#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn in_flight_counts_each_unacked_tag_once_per_queue() {
    let redis = Redis::start().await;
    let mut c = raw(&redis.url()).await;
    // kombu's layout, written in one transaction per message: ZADD unacked_index <time> <tag>
    // and HSET unacked <tag> [message, exchange, routing_key].
    let entry = |rk: &str| serde_json::json!([{"body": "...", "headers": {"task": "t"}}, "", rk]).to_string();
    let mut fill = redis::pipe();
    let mut hold = |prefix: &str, tag: &str, value: String| {
        fill.zadd(format!("{prefix}unacked_index"), tag, 1.0).ignore();
        fill.hset(format!("{prefix}unacked"), tag, value).ignore();
    };
    for i in 0..2500 {
        hold("", &format!("tag-a-{i}"), entry("alpha"));
    }
    hold("", "tag-b", entry("beta"));
    hold("", "tag-junk", "not json".into());
    hold("pfx:", "tag-g", entry("gamma"));
    // A tag whose message was acked between the two reads: listed, but its value is gone.
    fill.zadd("unacked_index", "tag-acked", 1.0).ignore();
    let _: () = fill.query_async(&mut c).await.unwrap();
    lpush(&mut c, b"alpha", 2).await;

    let pfx = TransportOptions { global_keyprefix: "pfx:".into(), ..TransportOptions::default() };
    let queries = vec![
        DepthQuery::new("alpha", &TransportOptions::default()),
        DepthQuery::new("beta", &TransportOptions::default()),
        DepthQuery::new("celery", &TransportOptions::default()),
        DepthQuery::new("gamma", &pfx),
        DepthQuery::new("alpha", &pfx),
    ];
    let mut conn = BrokerPool::default().connection(&endpoint(&redis.url())).await.unwrap();
    let got: Vec<(i64, i64)> = read_depths(&mut conn, "test", &queries)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.map(|d| (d.pending, d.in_flight)).unwrap())
        .collect();
    assert_eq!(got, [(2, 2500), (0, 1), (0, 0), (0, 1), (0, 0)], "(pending, inFlight) per query");
}

#[tokio::test]
#[ignore = "needs redis-server and the Celery venv: make test"]
async fn eta_tasks_held_by_a_real_worker_are_in_flight_not_pending() {
    let redis = Redis::start().await;
    support::celery(&redis.url(), &["later", "alpha", "5", "300"]);
    support::celery(&redis.url(), &["sendq", "beta", "3"]);
    let cmd: Vec<String> =
        ["celery", "-A", "app.worker", "worker", "--queues=alpha", "--concurrency=1", "-n", "eta@%h"]
            .map(String::from)
            .into();
    let _worker = support::Worker::start(&redis.url(), &cmd);
    let queries = vec![
        DepthQuery::new("alpha", &TransportOptions::default()),
        DepthQuery::new("beta", &TransportOptions::default()),
    ];
    let pool = BrokerPool::default();
    let sent = jiff::Timestamp::now().as_millisecond();
    let got = support::wait_for("the worker to hold the 5 ETA tasks", Duration::from_secs(60), || async {
        let mut conn = pool.connection(&endpoint(&redis.url())).await.ok()?;
        let d = read_depths(&mut conn, "test", &queries).await.ok()?;
        let got: Vec<(i64, i64, Vec<i64>)> =
            d.into_iter().map(|d| d.map(|d| (d.pending, d.in_flight, d.etas)).unwrap()).collect();
        (got[0].0 == 0 && got[0].1 == 5).then_some(got)
    })
    .await;
    assert_eq!(got[1], (3, 0, vec![]), "beta's messages are pending, not in flight (no worker consumes beta)");
    // Each held task's ETA is read from its message: about 300 s after it was sent.
    assert_eq!(got[0].2.len(), 5);
    for eta in &got[0].2 {
        let ahead = eta - sent;
        assert!((290_000..=310_000).contains(&ahead), "ETA {ahead} ms after sending, countdown was 300 s");
    }
    let mut c = raw(&redis.url()).await;
    let hlen: i64 = redis::cmd("HLEN").arg("unacked").query_async(&mut c).await.unwrap();
    assert_eq!(hlen, 5, "what Redis holds, counted by hand");
}

/// The ACL rule of a broker user that can do exactly what the operator does: depth reads
/// (LLEN; ZCARD and ZRANGE of the delivery tags, HGET of a new tag's message, SMEMBERS of a
/// named exchange's bindings; SELECT for a non-zero db) and the heartbeat subscription
/// (SUBSCRIBE). Documented in the README; keep the two in step.
const READ_ONLY_ACL: &str = "on >PASSWORD ~* &* -@all +llen +zcard +zrange +hget +smembers +select +subscribe";

#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn a_read_only_acl_user_is_enough_and_cannot_write() {
    let redis = Redis::start().await;
    let mut admin = raw(&format!("redis://127.0.0.1:{}/1", redis.port)).await;
    let rule = READ_ONLY_ACL.replace("PASSWORD", "r3ad-0nly");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("taskqueue-operator")
        .arg(rule.split(' ').collect::<Vec<_>>())
        .query_async(&mut admin)
        .await
        .unwrap();
    lpush(&mut admin, b"alpha", 3).await;
    lpush(&mut admin, b"alpha\x06\x169", 1).await;
    let entry = serde_json::json!([{"body": "..."}, "", "alpha"]).to_string();
    let _: () = redis::cmd("HSET").arg("unacked").arg("tag").arg(entry).query_async(&mut admin).await.unwrap();
    let _: () = redis::cmd("ZADD").arg("unacked_index").arg(1).arg("tag").query_async(&mut admin).await.unwrap();

    // Depth reads through the pool, as the poller does (db 1: SELECT is part of the handshake).
    let url = format!("redis://taskqueue-operator:r3ad-0nly@127.0.0.1:{}/1", redis.port);
    let ep = endpoint(&url);
    let mut conn = BrokerPool::new(Duration::from_secs(2)).connection(&ep).await.unwrap();
    let got = read_depths(&mut conn, "test", &[DepthQuery::new("alpha", &TransportOptions::default())]).await.unwrap();
    let alpha = got[0].as_ref().unwrap();
    assert_eq!((alpha.pending, alpha.in_flight), (4, 1));

    // The operator's own heartbeat subscription, as that user; it also carries list-push
    // notifications (turned on by the admin: the operator never changes the configuration).
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg("El").query_async(&mut admin).await.unwrap();
    let workers = taskqueue_operator::broker::heartbeat::SharedWorkers::default();
    let push = taskqueue_operator::broker::heartbeat::SharedPush::default();
    let pushed_keys: Arc<std::sync::Mutex<Vec<Vec<u8>>>> = Arc::default();
    let hook: taskqueue_operator::broker::heartbeat::PushHook = {
        let keys = pushed_keys.clone();
        Arc::new(move |key: &[u8]| keys.lock().unwrap().push(key.to_vec()))
    };
    let sub = tokio::spawn(taskqueue_operator::broker::heartbeat::subscribe(
        ep.clone(),
        vec![String::new()],
        workers.clone(),
        (push.clone(), hook),
        Duration::from_secs(2),
        (Limits::default(), Default::default()),
    ));
    let event = serde_json::json!({"hostname": "w@pod-1", "active": 2, "freq": 2.0, "type": "worker-heartbeat"});
    let envelope = serde_json::json!({"body": event.to_string(), "content-type": "application/json", "properties": {}});
    support::wait_for("the heartbeat seen through the read-only user", Duration::from_secs(10), || {
        let (workers, envelope) = (workers.clone(), envelope.to_string());
        let mut admin = admin.clone();
        async move {
            let _: i64 = redis::cmd("PUBLISH")
                .arg("/1.celeryev/worker.heartbeat")
                .arg(envelope)
                .query_async(&mut admin)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            workers.lock().unwrap().active("w@pod-1", std::time::Instant::now())
        }
    })
    .await;
    // A push to db 1 reaches the hook with its key.
    let _: () = redis::cmd("LPUSH").arg("alpha").arg("m").query_async(&mut admin).await.unwrap();
    support::wait_for("the push notification", Duration::from_secs(10), || {
        let keys = pushed_keys.clone();
        async move { keys.lock().unwrap().contains(&b"alpha".to_vec()).then_some(()) }
    })
    .await;
    assert!(push.lock().unwrap().is_some(), "the notification is noted");
    let mut user_conn = BrokerPool::new(Duration::from_secs(2)).connection(&ep).await.unwrap();
    let asked = taskqueue_operator::broker::heartbeat::notifications_configured(&mut user_conn).await;
    assert_eq!(asked, None, "CONFIG is not this user's: the notification itself tells");
    sub.abort();

    // Proof that it is read-only: writing is refused.
    let mut user =
        open_client(&ep, Duration::from_secs(2)).await.unwrap().get_multiplexed_async_connection().await.unwrap();
    for cmd in [
        redis::cmd("LPUSH").arg("alpha").arg("x").clone(),
        redis::cmd("DEL").arg("alpha").clone(),
        redis::cmd("PUBLISH").arg("c").arg("x").clone(),
    ] {
        let err = cmd.query_async::<redis::Value>(&mut user).await.unwrap_err();
        assert_eq!(err.code(), Some("NOPERM"), "{err}");
    }
}

async fn redis_with_password(pw: &str, replica_of: Option<u16>) -> (ChildGuard, TempDir, u16) {
    let port = support::free_port();
    let dir = TempDir::new(&format!("tq-redis-{port}"));
    let mut cmd =
        std::process::Command::new(std::env::var("TQ_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()));
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--requirepass", pw, "--masterauth", pw])
        .arg("--dir")
        .arg(&dir.0);
    if let Some(m) = replica_of {
        cmd.args(["--replicaof", "127.0.0.1", &m.to_string()]);
    }
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let guard = ChildGuard(child);
    let url = format!("redis://:{pw}@127.0.0.1:{port}/0");
    support::wait_for("redis-server to answer PING", Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            let mut c = redis::Client::open(url).ok()?.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("PING").query_async::<String>(&mut c).await.ok()
        }
    })
    .await;
    (guard, dir, port)
}

/// A directory removed on drop.
#[tokio::test]
#[ignore = "needs redis-server and redis-sentinel: make test"]
async fn sentinel_urls_read_the_master_the_sentinels_name_and_follow_a_failover() {
    let (_master, _master_dir, master_port) = redis_with_password("s3cret", None).await;
    let (_replica, _replica_dir, replica_port) = redis_with_password("s3cret", Some(master_port)).await;
    let mut c = raw(&format!("redis://:s3cret@127.0.0.1:{master_port}/3")).await;
    // Sentinels learn replicas from the master's INFO; attach it first so they know it at once.
    support::wait_for("the replica to attach", Duration::from_secs(10), || async {
        let info: String = redis::cmd("INFO").arg("replication").query_async(&mut c.clone()).await.ok()?;
        info.contains("connected_slaves:1").then_some(())
    })
    .await;
    let (s1, s2) = (
        Sentinel::start("mymaster", master_port, Some("s3cret")).await,
        Sentinel::start("mymaster", master_port, Some("s3cret")).await,
    );
    lpush(&mut c, b"sentq", 4).await;
    lpush(&mut c, b"sentq\x06\x166", 2).await;

    // The first sentinel is down: the next one answers. Password and db go to the master.
    let dead = support::free_port();
    let url = format!(
        "sentinel://:s3cret@127.0.0.1:{dead}/3;sentinel://127.0.0.1:{};sentinel://127.0.0.1:{}",
        s1.port, s2.port
    );
    let ep = BrokerEndpoint::resolve(&url, Some("mymaster"), None).unwrap();
    assert!(!format!("{ep} {ep:?}").contains("s3cret"));
    let queries = [DepthQuery::new("sentq", &TransportOptions::default())];
    let pool = BrokerPool::new(Duration::from_secs(2));
    let mut conn = pool.connection(&ep).await.unwrap();
    let got = read_depths(&mut conn, "test", &queries).await.unwrap();
    assert_eq!(got[0].as_ref().unwrap().pending, 6);

    // A master name the sentinels do not monitor names the field to fix.
    let wrong = BrokerEndpoint::resolve(&url, Some("nosuchmaster"), None).unwrap();
    let err = pool.connection(&wrong).await.unwrap_err();
    assert!(err.to_string().contains("spec.broker.transportOptions.masterName"), "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    // No sentinel at all: unreachable, naming every sentinel tried.
    let (d1, d2) = (support::free_port(), support::free_port());
    let gone = BrokerEndpoint::resolve(
        &format!("sentinel://:s3cret@127.0.0.1:{d1};sentinel://127.0.0.1:{d2}"),
        Some("mymaster"),
        None,
    )
    .unwrap();
    let err = pool.connection(&gone).await.unwrap_err();
    assert_eq!(err.reason(), "BrokerUnreachable", "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{d1}")) && err.to_string().contains(&format!("127.0.0.1:{d2}"))
    );
    assert!(!err.to_string().contains("s3cret"), "{err}");

    // Failover: the replica becomes master; a fresh client (what the pool dials after
    // forgetting a failed connection) goes to it.
    let rc = raw(&format!("redis://:s3cret@127.0.0.1:{replica_port}/3")).await;
    support::wait_for("the replica to hold the messages", Duration::from_secs(10), || async {
        let n: i64 = redis::cmd("LLEN").arg("sentq").query_async(&mut rc.clone()).await.ok()?;
        (n == 4).then_some(())
    })
    .await;
    let sc = raw(&format!("redis://127.0.0.1:{}", s1.port)).await;
    support::wait_for("the sentinel to accept a failover", Duration::from_secs(30), || async {
        redis::cmd("SENTINEL").arg("FAILOVER").arg("mymaster").query_async::<()>(&mut sc.clone()).await.ok()
    })
    .await;
    support::wait_for("the sentinels to name the new master", Duration::from_secs(30), || async {
        let client = open_client(&ep, Duration::from_secs(2)).await.ok()?;
        let port = match client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(_, p) => *p,
            _ => return None,
        };
        (port == replica_port).then_some(())
    })
    .await;
    pool.forget(&ep).await;
    let mut conn = pool.connection(&ep).await.unwrap();
    let role: String = redis::cmd("INFO").arg("replication").query_async(&mut conn).await.unwrap();
    assert!(role.contains("role:master"), "{role}");
    let got = read_depths(&mut conn, "test", &queries).await.unwrap();
    assert_eq!(got[0].as_ref().unwrap().pending, 6, "the replica had the messages");
}

#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn a_broker_no_taskqueue_uses_any_more_loses_its_connections() {
    let (a, b) = (Redis::start().await, Redis::start().await);
    let state = std::sync::Arc::new(BrokerState::new(Duration::from_secs(1)));
    let opts = TransportOptions::default();
    let key = |n: &str| ObjectRef::<TaskQueue>::new(n).within("ns");
    let target = |url: &str| Target {
        endpoint: endpoint(url),
        queries: vec![DepthQuery::new("q", &opts)],
        interval: Duration::from_secs(3600),
        weight: 10,
        pool: String::new(),
    };
    let (trigger, _rx) = futures::channel::mpsc::unbounded();
    state.register(key("a"), target(&a.url()));
    state.register(key("b"), target(&b.url()));
    state.tidy(&trigger).await;
    state.read_endpoint(&endpoint(&a.url())).await;
    state.read_endpoint(&endpoint(&b.url())).await;
    assert_eq!(state.connections().await, 2);
    let cb = raw(&b.url()).await;
    let clients = |cb: &redis::aio::MultiplexedConnection| {
        let mut cb = cb.clone();
        async move {
            let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut cb).await.unwrap();
            list.lines().count()
        }
    };
    // One pooled connection and one heartbeat subscription on b, besides this one.
    support::wait_for("b's reader and subscription", Duration::from_secs(10), || async {
        (clients(&cb).await == 3).then_some(())
    })
    .await;

    // The TaskQueue moves away from b (deleted, or its Secret now names another broker).
    state.unregister(&key("b"));
    state.tidy(&trigger).await;
    assert_eq!(state.connections().await, 1, "b's pooled connection is closed");
    assert_eq!(state.endpoints(), [endpoint(&a.url())]);
    support::wait_for("b left with only this test's connection", Duration::from_secs(10), || async {
        (clients(&cb).await == 1).then_some(())
    })
    .await;
}

#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn a_reading_that_lands_after_its_taskqueue_was_unregistered_is_not_kept() {
    let redis = Redis::start().await;
    let mut admin = raw(&redis.url()).await;
    lpush(&mut admin, b"alpha", 2).await;
    let state = Arc::new(BrokerState::new(Duration::from_secs(5)));
    let key = ObjectRef::<TaskQueue>::new("late").within("ns");
    state.register(key.clone(), target_on(&redis.url(), "alpha"));
    // The broker holds every command for a second: the read is under way when the TaskQueue
    // goes (its Lease lost, its spec made invalid, or deleted).
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(1000).query_async(&mut admin).await.unwrap();
    let read = tokio::spawn({
        let state = state.clone();
        let ep = endpoint(&redis.url());
        async move { state.read_endpoint(&ep).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!read.is_finished(), "the read waits for the paused broker");
    state.unregister(&key);
    let (changed, ok) = read.await.unwrap();
    assert!(ok, "the read itself worked");
    assert!(changed.is_empty(), "nobody is woken for it: {changed:?}");
    assert!(state.reading(&key).is_none(), "no reading is kept for an unregistered TaskQueue");
}

#[tokio::test]
#[ignore = "needs redis-server and the Celery venv: make test"]
async fn messages_sent_through_a_topic_exchange_are_in_flight_on_the_bound_queue() {
    let redis = Redis::start().await;
    let python = |args: &[&str]| {
        let mut c = support::python(&redis.url());
        c.env("PYTHONPATH", support::repo().join("tests")).args(args);
        c
    };
    // The worker declares the queue and its binding; tasks sent with routing key
    // 'feed.import' reach it through the topic exchange and wait for their countdown.
    let mut worker = python(&["-m", "celery", "-A", "celery_topic", "worker", "-Q", "feeds", "-c", "1"]);
    let _worker = support::ChildGuard(
        worker
            .args(["--loglevel=WARNING", "--without-mingle", "--without-gossip"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut admin = raw(&redis.url()).await;
    support::wait_for("the worker to bind feeds to its exchange", Duration::from_secs(60), || {
        let mut admin = admin.clone();
        async move {
            let n: i64 = redis::cmd("SCARD").arg("_kombu.binding.feeds").query_async(&mut admin).await.ok()?;
            (n > 0).then_some(())
        }
    })
    .await;
    let out = python(&["tests/celery_topic.py", "send", "4", "300"]).current_dir(support::repo()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let queries = vec![
        DepthQuery::new("feeds", &TransportOptions::default()),
        DepthQuery::new("feed.import", &TransportOptions::default()),
    ];
    let pool = BrokerPool::default();
    let got = support::wait_for("the worker to hold the 4 tasks", Duration::from_secs(60), || async {
        let mut conn = pool.connection(&endpoint(&redis.url())).await.ok()?;
        let d = read_depths(&mut conn, "test", &queries).await.ok()?;
        let got: Vec<i64> = d.into_iter().map(|d| d.unwrap().in_flight).collect();
        (got.iter().sum::<i64>() == 4).then_some(got)
    })
    .await;
    assert_eq!(got, [4, 0], "in flight on the bound queue, not under the routing key");
    let held: Vec<String> = redis::cmd("HVALS").arg("unacked").query_async(&mut admin).await.unwrap();
    assert!(held.iter().all(|v| v.ends_with(r#""feeds", "feed.import"]"#)), "what kombu holds: {held:?}");
}

#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn a_broker_user_without_a_needed_command_is_told_which_acl_to_give() {
    let redis = Redis::start().await;
    let mut admin = raw(&redis.url()).await;
    // The ACL this README documented before in-flight messages were read by tag.
    let old = "on >pw ~* &* -@all +llen +hscan +select +subscribe";
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("op")
        .arg(old.split(' ').collect::<Vec<_>>())
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://op:pw@127.0.0.1:{}/0", redis.port);
    let state = BrokerState::new(Duration::from_secs(2));
    let key = ObjectRef::<TaskQueue>::new("acl").within("ns");
    state.register(key.clone(), target_on(&url, "alpha"));
    let (_, ok) = state.read_endpoint(&endpoint(&url)).await;
    assert!(!ok);
    let err = state.reading(&key).unwrap().depths.unwrap_err();
    assert_eq!(err.reason(), "BrokerPermissionDenied", "{err}");
    assert!(err.to_string().contains("+zcard +zrange +hget"), "names the ACL to give: {err}");
    assert!(!err.to_string().contains("pw@"), "{err}");
}

#[tokio::test]
#[ignore = "needs redis-server and the Celery venv: make test"]
async fn messages_of_a_killed_worker_are_orphans_once_no_live_worker_can_hold_them() {
    let redis = Redis::start().await;
    let url = redis.url();
    let worker = |pod: &str| {
        let command = ["celery", "-A", "app.worker", "worker", "-Q", "orph", "--pool", "solo", "-n"];
        let mut command: Vec<String> = command.iter().map(|s| s.to_string()).collect();
        command.push(format!("orph@{pod}")); // as the Deployment `orph` names its pods' workers
        support::Worker::start(&url, &command)
    };
    let old = worker("orph-5d9f8b6c5d-aaaaa");
    let state = Arc::new(BrokerState::new(Duration::from_secs(5)));
    let key = ObjectRef::<TaskQueue>::new("orph").within("ns");
    state.register(key.clone(), Target { pool: "orph@orph".into(), ..target_on(&url, "orph") });
    state.sync_heartbeats();
    let live = |state: Arc<BrokerState>| {
        let key = key.clone();
        async move { state.workers(&key).map_or(0, |w| w.lock().unwrap().live(std::time::Instant::now())) }
    };
    support::wait_for("the worker's heartbeat", Duration::from_secs(60), || {
        let live = live(state.clone());
        async move { (live.await == 1).then_some(()) }
    })
    .await;
    // 6 countdown tasks: the worker fetches them at once and holds them for an hour.
    support::celery(&url, &["later", "orph", "6", "3600"]);
    let read = |state: Arc<BrokerState>| {
        let key = key.clone();
        let ep = endpoint(&url);
        async move {
            state.read_endpoint(&ep).await;
            let d = state.reading(&key)?.depths.ok()?[0].clone().ok()?;
            Some((d.in_flight, d.orphaned))
        }
    };
    support::wait_for("the worker to hold the 6 tasks", Duration::from_secs(60), || {
        let read = read(state.clone());
        async move { (read.await? == (6, 0)).then_some(()) }
    })
    .await;
    // Past the grace, held by a live worker that was there when they were delivered: held.
    tokio::time::sleep(ORPHAN_GRACE + Duration::from_secs(2)).await;
    assert_eq!(read(state.clone()).await, Some((6, 0)), "a live holder keeps them in flight");

    // The worker is SIGKILLed (no warm shutdown restores them) and its pod replaced.
    drop(old);
    let _new = worker("orph-5d9f8b6c5d-bbbbb");
    let got = support::wait_for("the 6 tasks to be orphans", Duration::from_secs(60), || {
        let read = read(state.clone());
        async move { read.await.filter(|r| r.1 == 6) }
    })
    .await;
    assert_eq!(got, (0, 6), "not in flight: only the replacement runs, and it started after them");
    assert_eq!(live(state.clone()).await, 1, "the replacement is alive");
    let mut admin = raw(&url).await;
    let held: i64 = redis::cmd("ZCARD").arg("unacked_index").query_async(&mut admin).await.unwrap();
    assert_eq!(held, 6, "kombu still holds them (restored after visibility_timeout)");
}

#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn two_urls_for_one_redis_share_a_queue_once() {
    let redis = Redis::start().await;
    let mut admin = raw(&redis.url()).await;
    lpush(&mut admin, b"shared_q", 8).await;
    // One server, two names: as a Service's short name and its FQDN would be.
    let (by_ip, by_name) =
        (format!("redis://127.0.0.1:{}/0", redis.port), format!("redis://localhost:{}/0", redis.port));
    let state = BrokerState::new(Duration::from_secs(2));
    let key = |n: &str| ObjectRef::<TaskQueue>::new(n).within("ns");
    let target = |url: &str| target_on(url, "shared_q");
    state.register(key("a"), target(&by_ip));
    state.register(key("b"), target(&by_name));
    // The first reads learn which server each URL reaches; the next ones count the queue once.
    for _ in 0..2 {
        for url in [&by_ip, &by_name] {
            assert!(state.read_endpoint(&endpoint(url)).await.1);
        }
    }
    let (a, b) = (state.reading(&key("a")).unwrap(), state.reading(&key("b")).unwrap());
    assert_eq!(a.shares[0].others(), "b (spec.queue)");
    let pending =
        |r: &taskqueue_operator::controller::poller::Reading| r.depths.as_ref().unwrap()[0].as_ref().unwrap().pending;
    assert_eq!((pending(&a), pending(&b)), (8, 8), "each reads the whole queue");
    assert_eq!(a.shares[0].part(8) + b.shares[0].part(8), 8, "and counts its part of it");
    // Another database on the same server is another queue.
    state.register(key("b"), target(&format!("redis://localhost:{}/1", redis.port)));
    for url in [by_ip.clone(), format!("redis://localhost:{}/1", redis.port)] {
        for _ in 0..2 {
            assert!(state.read_endpoint(&endpoint(&url)).await.1);
        }
    }
    assert!(!state.reading(&key("a")).unwrap().shares[0].is_shared());
}

#[tokio::test]
#[ignore = "needs redis-server and the Celery venv: make test"]
async fn an_eta_without_an_offset_is_read_as_the_worker_reads_it() {
    let redis = Redis::start().await;
    let python = |args: &[&str]| {
        let mut c = support::python(&redis.url());
        c.env("PYTHONPATH", support::repo().join("tests")).current_dir(support::repo()).args(args);
        c
    };
    // An app with timezone America/New_York (enable_utc off) sends 3 tasks with naive ETAs.
    let mut worker = python(&["-m", "celery", "-A", "celery_tz", "worker", "-Q", "tz", "-c", "1"]);
    let _worker = ChildGuard(
        worker
            .args(["--loglevel=WARNING", "--without-mingle", "--without-gossip"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let out = python(&["tests/celery_tz.py", "send", "3", "3600"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let queries = vec![DepthQuery::new("tz", &TransportOptions::default())];
    let pool = BrokerPool::default();
    let ours = support::wait_for("the worker to hold the 3 tasks", Duration::from_secs(60), || async {
        let mut conn = pool.connection(&endpoint(&redis.url())).await.ok()?;
        let d = read_depths(&mut conn, "test", &queries).await.ok()?.pop()?.ok()?;
        (d.etas.len() == 3).then_some(d.etas)
    })
    .await;
    let mut admin = raw(&redis.url()).await;
    let held: Vec<String> = redis::cmd("HVALS").arg("unacked").query_async(&mut admin).await.unwrap();
    assert!(held.iter().all(|v| !v.contains("+00:00") && !v.contains("-05:00")), "naive ETAs sent: {held:?}");
    // The worker's own reading of the same messages (Celery applies no `timezone` to them).
    let out = python(&["tests/celery_tz.py", "scheduled"]).output().unwrap();
    let mut theirs: Vec<i64> = String::from_utf8_lossy(&out.stdout).lines().map(|l| l.parse().unwrap()).collect();
    theirs.sort_unstable();
    assert_eq!(ours, theirs, "the operator's ETAs are the worker's");
}

/// `calls` of one command in Redis's `INFO commandstats` (0 before its first call).
async fn calls(c: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(c).await.unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn unacked_changing_under_the_reader_is_counted_exactly_once_it_settles_and_each_value_read_once() {
    let redis = Redis::start().await;
    let mut c = raw(&redis.url()).await;
    let entry = serde_json::json!([{"body": "...", "headers": {"task": "t"}}, "", "alpha"]).to_string();
    // Workers fetching and acking, as kombu writes it: ZADD + HSET, ZREM + HDEL, each in a
    // transaction. 30 000 held to begin with: more than one page of tags.
    let hold = move |pipe: &mut redis::Pipeline, from: u64, n: u64| {
        for i in from..from + n {
            pipe.zadd("unacked_index", format!("tag-{i}"), i as f64).ignore();
            pipe.hset("unacked", format!("tag-{i}"), &entry).ignore();
        }
    };
    let mut fill = redis::pipe();
    fill.atomic();
    hold(&mut fill, 0, 30_000);
    let _: () = fill.query_async(&mut c).await.unwrap();
    let state = Arc::new(BrokerState::new(Duration::from_secs(10)));
    let key = ObjectRef::<TaskQueue>::new("alpha").within("ns");
    state.register(key.clone(), target_on(&redis.url(), "alpha"));
    // The churn: every batch 500 new tags in, the 400 oldest out, which shifts every page.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (mut c, stop) = (c.clone(), stop.clone());
        tokio::spawn(async move {
            let mut next = 30_000u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut batch = redis::pipe();
                batch.atomic();
                hold(&mut batch, next, 500);
                let _: () = batch.query_async(&mut c).await.unwrap();
                next += 500;
                let oldest: Vec<String> =
                    redis::cmd("ZRANGE").arg("unacked_index").arg(0).arg(399).query_async(&mut c).await.unwrap();
                let _: () = redis::pipe()
                    .atomic()
                    .zrem("unacked_index", &oldest)
                    .hdel("unacked", &oldest)
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
            next
        })
    };
    let ep = endpoint(&redis.url());
    let mut reads = 0;
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < until {
        assert!(state.read_endpoint(&ep).await.1, "reads under churn work");
        reads += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let added = churn.await.unwrap();
    assert!(state.read_endpoint(&ep).await.1);
    let held: i64 = redis::cmd("ZCARD").arg("unacked_index").query_async(&mut c).await.unwrap();
    let depth = state.reading(&key).unwrap().depths.unwrap()[0].clone().unwrap();
    println!("{reads} reads under churn; {added} tags added, {held} held at the end");
    assert_eq!(depth.in_flight, held, "exact once it settles");
    let hgets = calls(&mut c, "hget").await;
    assert!(hgets <= added, "each value read at most once: {hgets} HGETs for {added} tags");
}
