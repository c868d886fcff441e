//! What a broker can do to the operator (issue: broker cost and safety), against a real
//! redis-server and a hostile listener written here: replies over the bound are refused with a
//! message that names the size and the bound while a neighbour broker keeps being read; big
//! unacked messages are read once and only their ends are held; a quiet read costs the lists
//! and the tags, not the payloads.

mod support;

use std::io::{Read, Write};

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use kube::runtime::reflector::ObjectRef;
use support::Redis;
use taskqueue_operator::broker::heartbeat::{self, PushHook, SharedPush, SharedWorkers};
use taskqueue_operator::broker::resp::{Limits, DEFAULT_MAX_REPLY};
use taskqueue_operator::broker::{BrokerEndpoint, DepthQuery};
use taskqueue_operator::controller::poller::{BrokerState, Target};
use taskqueue_operator::crd::{TaskQueue, TransportOptions};

/// A loopback listener that reads the first bytes of every connection and hands it to
/// `answer`, on a thread of its own. Returns its port.
fn listener(answer: impl Fn(std::net::TcpStream) + Clone + Send + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                answer(conn);
            });
        }
    });
    port
}

/// A listener that answers every connection with `reply`, then holds the connection open for a
/// while (a broker that announces more than it sends). Returns its port.
fn hostile(reply: Vec<u8>) -> u16 {
    listener(move |mut conn| {
        let _ = conn.write_all(&reply);
        std::thread::sleep(Duration::from_secs(10));
    })
}

/// A connection for the test's own writes and INFO reads, with no reply timeout: writing a 36 MB
/// value on a loaded 2-core machine can take longer than redis-rs's default (CI saw it time out).
async fn admin(url: &str) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(url).unwrap().get_multiplexed_async_connection_with_config(&config).await.unwrap()
}

fn key(name: &str) -> ObjectRef<TaskQueue> {
    ObjectRef::<TaskQueue>::new(name).within("ns")
}

fn target(url: &str, queue: &str) -> Target {
    Target {
        endpoint: BrokerEndpoint::parse(url).unwrap(),
        queries: vec![DepthQuery::new(queue, &TransportOptions::default())],
        interval: Duration::from_millis(100),
        weight: 10,
        pool: String::new(),
    }
}

#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn a_broker_that_sends_too_much_is_cut_off_and_its_neighbour_keeps_being_read() {
    let healthy = Redis::start().await;
    support::lpush(&healthy.url(), "alpha", 3).await;
    let bound = DEFAULT_MAX_REPLY;
    let mut endless_line = b"+".to_vec();
    endless_line.extend(std::iter::repeat_n(b'a', bound + 1024));
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        ("a 2 GB bulk string", b"$2147483648\r\n".to_vec(), format!("a reply over the bound of {bound}")),
        ("an array of 2^31 elements", b"*2147483648\r\n".to_vec(), format!("over the bound of {bound}")),
        ("100 000 nested arrays", b"*1\r\n".repeat(100_000), "nested more than 8 arrays deep".into()),
        ("an HTTP server", b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(), "bytes that are not a Redis reply;".into()),
        ("a line without an end", endless_line, "a reply line of more than 65536 bytes".into()),
    ];
    let state = Arc::new(BrokerState::new(Duration::from_secs(2)));
    state.register(key("healthy"), target(&healthy.url(), "alpha"));
    let mut table = String::from("| the broker sends | reason | message | the neighbour broker |\n|---|---|---|---|\n");
    for (what, reply, says) in cases {
        let port = hostile(reply);
        let url = format!("redis://127.0.0.1:{port}/0");
        state.register(key("hostile"), target(&url, "alpha"));
        let (_, ok) = state.read_endpoint(&BrokerEndpoint::parse(&url).unwrap()).await;
        assert!(!ok, "{what}: the read fails");
        let err = state.reading(&key("hostile")).unwrap().depths.unwrap_err();
        assert_eq!(err.reason(), "BrokerReplyRejected", "{what}: {err}");
        assert!(err.to_string().contains(&says), "{what}: {err}");
        // The neighbour on another broker is read as before.
        let (_, ok) = state.read_endpoint(&BrokerEndpoint::parse(&healthy.url()).unwrap()).await;
        assert!(ok, "{what}: the healthy broker is still read");
        let depths = state.reading(&key("healthy")).unwrap().depths.unwrap();
        assert_eq!(depths[0].as_ref().unwrap().pending, 3, "{what}");
        state.unregister(&key("hostile"));
        let shown = err.to_string().replace(&format!("127.0.0.1:{port}"), "127.0.0.1:PORT");
        table += &format!("| {what} | `{}` | {shown} | read: pending 3 |\n", err.reason());
    }
    support::docs::checked("docs/broker-reads.md", "hostile-replies", &table, str::to_string);
}

/// A listener that answers every command it reads with `reply` (one per `*` header the bytes
/// hold), as a server that speaks RESP but is not the broker would. Returns its port.
fn answering(reply: &'static [u8]) -> u16 {
    listener(move |mut conn| {
        // The first read (taken by `listener`, not seen here) held one command or a pipeline
        // of them: enough replies for any; the surplus answers the next commands.
        let _ = conn.write_all(&reply.repeat(256));
        let mut buf = [0u8; 64 << 10];
        while let Ok(n @ 1..) = conn.read(&mut buf) {
            let commands =
                buf[..n].windows(3).filter(|w| w[0] == b'\n' && w[1] == b'*').count() + usize::from(buf[0] == b'*');
            if conn.write_all(&reply.repeat(commands)).is_err() {
                return;
            }
        }
    })
}

/// A TaskQueue's broker URL may name any address the operator can reach: what answers there
/// must not come back in its condition (an HTTP server's first bytes, an error reply's text, a
/// reply of the wrong type). The reason and the operator's own words only.
#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn broker_errors_never_echo_what_the_peer_sent() {
    let cases: Vec<(&str, u16)> = vec![
        ("an HTTP server", hostile(b"HTTP/1.1 400 secret-42\r\n\r\n".to_vec())),
        ("an error reply of its own", answering(b"-ERR secret-42\r\n")),
        ("an error reply with an unknown code", answering(b"-SECRET42 secret-42\r\n")),
        ("a permission error with its text", answering(b"-NOPERM secret-42\r\n")),
        ("an authentication error with its text", answering(b"-WRONGPASS secret-42\r\n")),
        ("a status line where numbers belong", answering(b"+secret-42\r\n")),
        ("a bulk string where numbers belong", answering(b"$9\r\nsecret-42\r\n")),
    ];
    let state = Arc::new(BrokerState::new(Duration::from_secs(2)));
    for (what, port) in cases {
        let url = format!("redis://127.0.0.1:{port}/0");
        state.register(key("peer"), target(&url, "alpha"));
        let (_, ok) = state.read_endpoint(&BrokerEndpoint::parse(&url).unwrap()).await;
        let err = state.reading(&key("peer")).unwrap().depths.expect_err(what);
        println!("{what}: {} ({err})", err.reason());
        assert!(!ok, "{what}: the read fails");
        let text = err.to_string();
        assert!(!text.contains("secret") && !text.contains("HTTP") && !text.contains("400"), "{what}: {text}");
        state.unregister(&key("peer"));
    }
}

#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn a_heartbeat_message_over_the_bound_closes_the_subscription_and_it_comes_back() {
    let redis = Redis::start().await;
    let admin = admin(&redis.url()).await;
    let workers = SharedWorkers::default();
    let hook: PushHook = Arc::new(|_: &[u8]| {});
    let limits = Limits { max_reply: 64 << 10, ..Limits::default() };
    let sub = tokio::spawn(heartbeat::subscribe(
        BrokerEndpoint::parse(&redis.url()).unwrap(),
        vec![String::new()],
        workers.clone(),
        (SharedPush::default(), hook),
        Duration::from_secs(2),
        (limits, Default::default()),
    ));
    let beat = |host: &str| {
        let event = serde_json::json!({"hostname": host, "active": 1, "freq": 2.0, "type": "worker-heartbeat"});
        serde_json::json!({"body": event.to_string(), "content-type": "application/json", "properties": {}}).to_string()
    };
    let publish = |payload: String| {
        let mut admin = admin.clone();
        async move {
            redis::cmd("PUBLISH").arg("/0.celeryev/worker.heartbeat").arg(payload).query_async::<i64>(&mut admin).await
        }
    };
    let seen = |host: &'static str| {
        let (workers, publish, payload) = (workers.clone(), publish, beat(host));
        async move {
            support::wait_for(&format!("the heartbeat of {host}"), Duration::from_secs(30), || {
                let (workers, publish, payload) = (workers.clone(), publish, payload.clone());
                async move {
                    publish(payload).await.ok()?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    workers.lock().unwrap().active(host, Instant::now())
                }
            })
            .await
        }
    };
    seen("w@before").await;
    let subscriber = pubsub_client_ids(&mut admin.clone()).await;
    assert_eq!(subscriber.len(), 1, "one subscription: {subscriber:?}");
    // 1 MiB on the channel, 16 times the bound: the subscription drops it, and the connection.
    let receivers = publish("x".repeat(1 << 20)).await.unwrap();
    assert_eq!(receivers, 1, "the operator was subscribed when the big message came");
    // The subscription comes back on a new connection (after its 1 s backoff) and hears
    // heartbeats again.
    seen("w@after").await;
    let again = pubsub_client_ids(&mut admin.clone()).await;
    assert!(again.len() == 1 && again != subscriber, "a new subscription replaced {subscriber:?}: {again:?}");
    sub.abort();
}

/// Connections the server has accepted so far (`INFO stats`).
async fn connections_received(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query_async(c).await.unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// The ids of the clients subscribed to something (`CLIENT LIST TYPE pubsub`).
async fn pubsub_client_ids(admin: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let list: String = redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("pubsub").query_async(admin).await.unwrap();
    list.lines().filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")).map(String::from)).collect()
}

/// kombu's `unacked` value for a protocol 2 task carrying `file_mb` MB of base64 argument.
fn big_message(tag: &str, queue: &str, file_mb: usize, eta: Option<&str>) -> String {
    let file = base64::engine::general_purpose::STANDARD.encode(vec![7u8; file_mb << 20]);
    let body = base64::engine::general_purpose::STANDARD.encode(format!(r#"[["{file}"], {{}}, {{}}]"#));
    let eta = eta.map_or("null".into(), |e| format!("\"{e}\""));
    format!(
        r#"[{{"body": "{body}", "content-encoding": "utf-8", "content-type": "application/json", "headers": {{"lang": "py", "task": "app.upload", "id": "{tag}", "eta": {eta}, "retries": 0}}, "properties": {{"delivery_info": {{"exchange": "", "routing_key": "{queue}"}}, "priority": 0, "body_encoding": "base64", "delivery_tag": "{tag}"}}}}, "", "{queue}"]"#
    )
}

async fn net_output(c: &mut redis::aio::MultiplexedConnection) -> (u64, u64) {
    let info: String = redis::cmd("INFO").arg("stats").query_async(c).await.unwrap();
    let out = info
        .lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    (out, info.len() as u64)
}

#[tokio::test]
#[ignore = "needs redis-server: make test"]
async fn big_unacked_messages_are_read_once_and_a_quiet_read_costs_the_tags_not_the_payloads() {
    let redis = Redis::start().await;
    let mut c = admin(&redis.url()).await;
    // 8 tasks each carrying a 20 MB file (27 MB messages), 3 of them with an ETA an hour away.
    let eta = (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600)).to_string();
    for i in 0..8 {
        let tag = format!("tag-{i}");
        let value = big_message(&tag, "big", 20, (i < 3).then_some(eta.as_str()));
        let _: () = redis::pipe()
            .zadd("unacked_index", &tag, i as f64)
            .hset("unacked", &tag, value)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    support::lpush(&redis.url(), "big", 2).await;

    // `depth`, as a user runs it: its peak RSS holds the ends of each message, not the messages.
    let bin = env!("CARGO_BIN_EXE_taskqueue-operator");
    let (status, out, peak_kib) =
        peak_rss(&[bin, "depth", "--broker-url", &redis.url(), "--queue", "big", "--eta-horizon", "30s"]);
    assert!(status.success(), "depth exited {status}: {out}");
    let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (line["pending"].as_i64(), line["inFlight"].as_i64(), line["scheduled"].as_i64()),
        (Some(2), Some(5), Some(3)),
        "{out}"
    );
    println!("depth over 8 x 27 MB in flight: peak RSS {} MiB", peak_kib / 1024);
    // The issue's target is 96 MiB; reading each value whole, one at a time, already peaks at 98.
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");

    // The operator's reader: the first read streams each message once ...
    let state = BrokerState::new(Duration::from_secs(60));
    state.register(key("big"), target(&redis.url(), "big"));
    let ep = BrokerEndpoint::parse(&redis.url()).unwrap();
    let (before, _) = net_output(&mut c).await;
    assert!(state.read_endpoint(&ep).await.1);
    let (after_first, info_len) = net_output(&mut c).await;
    let first = after_first - before - info_len;
    assert!(first > 8 * 27_000_000, "the first read streamed the messages ({first} bytes)");
    let depth = state.reading(&key("big")).unwrap().depths.unwrap()[0].clone().unwrap();
    assert_eq!((depth.pending, depth.in_flight, depth.etas.len()), (2, 8, 3));
    // ... and a quiet read sends 4 LLENs and 8 tags: at most 64 bytes each, plus the ZCARD.
    let (before, _) = net_output(&mut c).await;
    assert!(state.read_endpoint(&ep).await.1);
    let (after, info_len) = net_output(&mut c).await;
    let quiet = after - before - info_len;
    println!("first read {first} bytes, quiet read {quiet} bytes");
    support::docs::measured(
        "docs/broker-reads.md",
        "big-messages",
        &format!(
            "| 8 held messages of 36 MB (20 MB files), 2 pending | measured |\n|---|---|\n\
             | `taskqueue-operator depth --queue big`: peak RSS | {} MiB |\n\
             | the poller's first read: Redis output | {first} bytes |\n\
             | a quiet read after it: Redis output | {quiet} bytes |\n",
            peak_kib / 1024
        ),
    );
    assert!(quiet <= 64 * 4 + 64 * 8 + 64, "a quiet read cost {quiet} bytes");
    // A tag acked since is dropped; a new one is read.
    let _: () =
        redis::pipe().zrem("unacked_index", "tag-0").hdel("unacked", "tag-0").query_async(&mut c).await.unwrap();
    let _: () = redis::pipe()
        .zadd("unacked_index", "tag-new", 9.0)
        .hset("unacked", "tag-new", big_message("tag-new", "big", 1, None))
        .query_async(&mut c)
        .await
        .unwrap();
    let dialled = connections_received(&mut c).await;
    assert!(state.read_endpoint(&ep).await.1);
    let depth = state.reading(&key("big")).unwrap().depths.unwrap()[0].clone().unwrap();
    assert_eq!((depth.in_flight, depth.etas.len()), (8, 2), "tag-0 (with an ETA) gone, tag-new in");
    assert_eq!(connections_received(&mut c).await, dialled, "the new value is read on the kept connection");
}

/// Run `cmd`; its exit status, its standard output and its peak resident set in KiB. A small
/// Python parent forks it and reads wait4's figure: the test process cannot, because a child's
/// peak counts the memory of the process it was forked from (this one holds the messages).
fn peak_rss(cmd: &[&str]) -> (std::process::ExitStatus, String, i64) {
    const WRAP: &str = "import resource, subprocess, sys\n\
        r = subprocess.run(sys.argv[1:])\n\
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n\
        sys.exit(r.returncode)";
    let out = std::process::Command::new("python3").arg("-c").arg(WRAP).args(cmd).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let peak = stderr.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("{stderr}"));
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), peak)
}

#[tokio::test]
#[ignore = "needs redis-server and the Celery venv: make test"]
async fn real_celery_tasks_with_big_arguments_held_by_a_worker_are_counted_in_bounded_memory() {
    for protocol in ["2", "1"] {
        let redis = Redis::start().await;
        let python = |args: &[&str]| {
            let mut c = support::python(&redis.url());
            c.env("PYTHONPATH", support::repo().join("tests")).env("TASK_PROTOCOL", protocol).args(args);
            c
        };
        let worker = python(&["-m", "celery", "-A", "celery_big", "worker", "-Q", "big", "-c", "1"])
            .args(["--loglevel=WARNING", "--without-mingle", "--without-gossip"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let _worker = support::ChildGuard(worker);
        // 4 tasks with a 20 MB file each (27 MB as base64 in the arguments), due in 300 s: the
        // worker fetches them at once and holds them in `unacked` until then.
        let out =
            python(&["tests/celery_big.py", "send", "4", "20", "300"]).current_dir(support::repo()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut c = admin(&redis.url()).await;
        support::wait_for("the worker to hold the 4 tasks", Duration::from_secs(60), || {
            let mut c = c.clone();
            async move {
                let n: i64 = redis::cmd("ZCARD").arg("unacked_index").query_async(&mut c).await.ok()?;
                (n == 4).then_some(())
            }
        })
        .await;
        let bin = env!("CARGO_BIN_EXE_taskqueue-operator");
        let (status, out, peak_kib) =
            peak_rss(&[bin, "depth", "--broker-url", &redis.url(), "--queue", "big", "--eta-horizon", "30s"]);
        assert!(status.success(), "protocol {protocol}: depth exited {status}: {out}");
        let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(
            (line["pending"].as_i64(), line["inFlight"].as_i64(), line["scheduled"].as_i64()),
            (Some(0), Some(0), Some(4)),
            "protocol {protocol}: held until due in 300 s, so scheduled: {out}"
        );
        assert!(peak_kib < 64 * 1024, "protocol {protocol}: peak RSS {peak_kib} KiB");
        // The poller: after the first read, a quiet read costs the lists and the 4 tags.
        let state = BrokerState::new(Duration::from_secs(60));
        state.register(key("big"), target(&redis.url(), "big"));
        let ep = BrokerEndpoint::parse(&redis.url()).unwrap();
        assert!(state.read_endpoint(&ep).await.1);
        let (before, _) = net_output(&mut c).await;
        assert!(state.read_endpoint(&ep).await.1);
        let (after, info_len) = net_output(&mut c).await;
        let quiet = after - before - info_len;
        assert!(quiet <= 64 * 4 + 64 * 4 + 64, "protocol {protocol}: a quiet read cost {quiet} bytes");
        let depth = state.reading(&key("big")).unwrap().depths.unwrap()[0].clone().unwrap();
        assert_eq!((depth.in_flight, depth.etas.len()), (4, 4), "protocol {protocol}");
        println!("protocol {protocol}: depth peak RSS {} MiB, quiet read {quiet} bytes", peak_kib / 1024);
    }
}

/// A listener that answers every connection with `header` and then streams `filler` bytes until
/// the peer hangs up (a broker that really sends gigabytes). Returns its port.
fn hostile_stream(header: &'static [u8], filler: u8) -> u16 {
    listener(move |mut conn| {
        let chunk = vec![filler; 64 << 10];
        let _ = conn.write_all(header);
        while conn.write_all(&chunk).is_ok() {}
    })
}

/// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM).
fn proc_kib(pid: u32, field: &str) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in {status}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn the_operator_process_stays_small_whatever_a_broker_sends_and_keeps_scaling_the_others() {
    use support::{broker_secret, client, create_taskqueue, ensure_crd, free_port, namespace, pool, wait_replicas};
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "bounds").await;
    let healthy = Redis::start().await;
    let mut admin = admin(&healthy.url()).await;
    // Redis itself would drop a subscriber 32 MB behind (its pubsub output buffer limit): lifted,
    // so the 500 MB message below really reaches the operator.
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "client-output-buffer-limit", "pubsub 0 0 0"][..])
        .query_async(&mut admin)
        .await
        .unwrap();
    broker_secret(&client, &ns, &healthy.url()).await;
    let scaling =
        serde_json::json!({"maxReplicas": 10, "pollInterval": "500ms", "scaleDown": {"stabilizationWindow": "1s"}});
    create_taskqueue(&client, &ns, pool("healthy", "alpha", scaling.clone())).await;
    let metrics_port = free_port();
    let mut operator = support::ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_taskqueue-operator"))
            .args(["run", "--namespace", &ns, "--broker-timeout", "1s", "--leader-election=false"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = operator.0.id();
    support::lpush(&healthy.url(), "alpha", 8).await;
    wait_replicas(&client, &ns, "healthy", 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = proc_kib(pid, "VmHWM");

    // Three brokers that send gigabytes, and 500 MB published on the heartbeat channel.
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client.clone(), &ns);
    for (name, port) in [
        ("bulk", hostile_stream(b"$2147483648\r\n", b'x')),
        ("line", hostile_stream(b"+", b'a')),
        ("array", hostile_stream(b"*2147483648\r\n", b'*')),
        ("within", hostile_stream(b"$1048000\r\n", b'x')),
    ] {
        let url = format!("redis://127.0.0.1:{port}/0");
        let secret = serde_json::json!({"metadata": {"name": name}, "stringData": {"url": url}});
        api.create(&Default::default(), &serde_json::from_value(secret).unwrap()).await.unwrap();
        let mut tq = pool(name, "alpha", scaling.clone());
        tq["spec"]["broker"]["urlSecretRef"]["name"] = name.into();
        create_taskqueue(&client, &ns, tq).await;
    }
    let big = vec![b'h'; 500 << 20];
    let _: i64 =
        redis::cmd("PUBLISH").arg("/0.celeryev/worker.heartbeat").arg(&big).query_async(&mut admin).await.unwrap();
    drop(big);
    for name in ["bulk", "line", "array", "within"] {
        let (_, message) = support::wait_condition(&client, &ns, name, "BrokerReachable", "False").await;
        let says = match name {
            "line" => "a reply line of more than",
            "within" => "not a Redis reply", // the whole bulk, then what follows it
            _ => "over the bound",
        };
        assert!(message.contains(says), "{name}: {message}");
    }
    // The healthy pool keeps following its queue.
    support::lpush(&healthy.url(), "alpha", 8).await;
    wait_replicas(&client, &ns, "healthy", 4).await;
    let peak = proc_kib(pid, "VmHWM");
    assert!(operator.0.try_wait().unwrap().is_none(), "the operator process is still the first one");
    let (_, metrics) = support::http_get(metrics_port, "/metrics");
    let received = support::metric(&metrics, "taskqueue_broker_received_bytes_total");
    println!("operator peak RSS {baseline} KiB before, {peak} KiB after; {received} bytes received from brokers");
    support::docs::measured(
        "docs/broker-reads.md",
        "operator-rss",
        &format!(
            "| the operator process (`run`), one healthy TaskQueue beside | measured |\n|---|---|\n\
             | peak RSS before (steady, scaling) | {} MiB |\n\
             | peak RSS after 4 brokers streaming a 2 GB bulk, an endless line, a 2^31 array, a bulk just within the 1 MiB bound followed by more, and a 500 MB PUBLISH on the heartbeat channel | {} MiB |\n\
             | bytes received from all brokers (`taskqueue_broker_received_bytes_total`) | {} |\n",
            baseline / 1024,
            peak / 1024,
            received
        ),
    );
    assert!(peak - baseline < 12 << 10, "peak RSS grew by {} KiB", peak - baseline);
}
