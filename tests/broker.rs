//! Broker reading against a real redis-server: kombu's key layout, error classification,
//! connection reuse, and one pipelined round trip per broker per tick.

mod support;

use std::time::{Duration, Instant};

use kube::runtime::reflector::ObjectRef;
use support::Redis;
use taskqueue_operator::broker::reader::read_depths;
use taskqueue_operator::broker::{BrokerEndpoint, BrokerPool, DepthQuery, ReadError};
use taskqueue_operator::controller::poller::{BrokerState, Schedule, Target};
use taskqueue_operator::crd::{TaskQueue, TransportOptions};

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn lpush(c: &mut redis::aio::MultiplexedConnection, key: &[u8], n: usize) {
    for i in 0..n {
        let _: () = redis::cmd("LPUSH").arg(key).arg(format!("m{i}")).query_async(c).await.unwrap();
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

    let custom = TransportOptions { global_keyprefix: "pfx:".into(), priority_steps: vec![0, 5], sep: ":".into() };
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
    let state = BrokerState::new(Duration::from_secs(1));
    let opts = TransportOptions::default();
    let key = |n: &str| ObjectRef::<TaskQueue>::new(n).within("ns");
    let target = |url: &str, queues: &[&str]| Target {
        endpoint: endpoint(url),
        queries: queues.iter().map(|q| DepthQuery::new(q, &opts)).collect(),
        interval: Duration::from_millis(100),
    };
    // Three TaskQueues on broker a (two share a queue), one on broker b.
    state.register(key("ai"), target(&a.url(), &["ai_processing"])).await;
    state.register(key("demo"), target(&a.url(), &["demo_tasks"])).await;
    state.register(key("both"), target(&a.url(), &["ai_processing", "demo_tasks"])).await;
    state.register(key("other"), target(&b.url(), &["celery"])).await;

    let conns_before = total_connections(&mut ca).await;
    let mut schedule = Schedule::default();
    let t0 = Instant::now();
    let (changed, _) = state.poll_due(&mut schedule, t0).await;
    assert_eq!(changed.len(), 4, "first reading of every TaskQueue is a change");
    assert_eq!(state.round_trips.load(std::sync::atomic::Ordering::Relaxed), 2, "one per broker");
    let both = state.reading(&key("both")).await.unwrap().depths.unwrap();
    assert_eq!(both.iter().map(|d| d.as_ref().unwrap().pending).collect::<Vec<_>>(), [3, 7]);

    // Not due yet: no reads. Due again: one more round trip per broker, nothing changed.
    let (changed, _) = state.poll_due(&mut schedule, t0 + Duration::from_millis(50)).await;
    assert!(changed.is_empty());
    assert_eq!(state.round_trips.load(std::sync::atomic::Ordering::Relaxed), 2);
    for i in 1..=5 {
        let (changed, _) = state.poll_due(&mut schedule, t0 + Duration::from_millis(100 * i)).await;
        assert!(changed.is_empty(), "same depths: no reconcile wake-ups");
    }
    assert_eq!(state.round_trips.load(std::sync::atomic::Ordering::Relaxed), 12);
    // The pool dialled broker a once for all of that.
    assert_eq!(total_connections(&mut ca).await - conns_before, 1);

    lpush(&mut ca, b"ai_processing", 1).await;
    let (mut changed, _) = state.poll_due(&mut schedule, t0 + Duration::from_secs(1)).await;
    changed.sort_by_key(|k| k.name.clone());
    assert_eq!(changed, [key("ai"), key("both")], "only the TaskQueues whose depth moved are woken");
}

async fn total_connections(c: &mut redis::aio::MultiplexedConnection) -> i64 {
    let info: String = redis::cmd("INFO").arg("stats").query_async(c).await.unwrap();
    info.lines().find_map(|l| l.strip_prefix("total_connections_received:")).unwrap().trim().parse().unwrap()
}

#[tokio::test]
#[ignore = "needs redis-server and openssl: make test"]
async fn rediss_verifies_the_server_certificate_unless_the_url_opts_out() {
    let dir = std::env::temp_dir().join(format!("tq-tls-{}", support::free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let port = support::free_port();
    let _server = support::ChildGuard(
        std::process::Command::new(std::env::var("TQ_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()))
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--tls-port",
                &port.to_string(),
            ])
            .args(["--tls-auth-clients", "no"])
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

    // A self-signed certificate is not trusted: the read fails instead of silently connecting.
    let verified = format!("rediss://127.0.0.1:{port}/0");
    let pool = BrokerPool::new(Duration::from_secs(2));
    let refused = match pool.connection(&endpoint(&verified)).await {
        Err(e) => e,
        Ok(mut conn) => {
            read_depths(&mut conn, "test", &[DepthQuery::new("q", &TransportOptions::default())]).await.unwrap_err()
        }
    };
    assert!(refused.to_string().to_lowercase().contains("certificate"), "{refused}");
    // Celery's explicit opt-out is honoured.
    let insecure = format!("rediss://127.0.0.1:{port}/0?ssl_cert_reqs=CERT_NONE");
    let mut conn = BrokerPool::new(Duration::from_secs(2)).connection(&endpoint(&insecure)).await.unwrap();
    let depth = read_depths(&mut conn, "test", &[DepthQuery::new("q", &TransportOptions::default())]).await.unwrap();
    assert_eq!(depth[0].as_ref().unwrap().pending, 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn in_flight_counts_unacked_entries_per_queue_across_scan_pages() {
    let redis = Redis::start().await;
    let mut c = raw(&redis.url()).await;
    // kombu's layout: HSET unacked <delivery_tag> [message, exchange, routing_key]
    let entry = |rk: &str| serde_json::json!([{"body": "...", "headers": {"task": "t"}}, "", rk]).to_string();
    let mut fill = redis::pipe();
    for i in 0..2500 {
        fill.hset("unacked", format!("tag-a-{i}"), entry("alpha")).ignore();
    }
    fill.hset("unacked", "tag-b", entry("beta")).ignore();
    fill.hset("unacked", "tag-junk", "not json").ignore();
    fill.hset("pfx:unacked", "tag-g", entry("gamma")).ignore();
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
    let got = support::wait_for("the worker to hold the 5 ETA tasks", Duration::from_secs(60), || async {
        let mut conn = pool.connection(&endpoint(&redis.url())).await.ok()?;
        let d = read_depths(&mut conn, "test", &queries).await.ok()?;
        let got: Vec<(i64, i64)> = d.into_iter().map(|d| d.map(|d| (d.pending, d.in_flight)).unwrap()).collect();
        (got[0] == (0, 5)).then_some(got)
    })
    .await;
    assert_eq!(got[1], (3, 0), "beta's messages are pending, not in flight (no worker consumes beta)");
    let mut c = raw(&redis.url()).await;
    let hlen: i64 = redis::cmd("HLEN").arg("unacked").query_async(&mut c).await.unwrap();
    assert_eq!(hlen, 5, "what Redis holds, counted by hand");
}
