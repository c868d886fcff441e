//! What one quiet poll costs the broker, from Redis's own `INFO` counters: bytes sent to the
//! reader (`total_net_output_bytes`) and Redis CPU (`used_cpu_user + used_cpu_sys`), for 1 000
//! queues with held (unacked) messages of several sizes. Three readers, one after another on the
//! same data:
//!
//! * **lists only**: the `LLEN`s alone, what a list-length scaler reads (the floor);
//! * **HSCAN (before)**: the read this operator did until this change: the `LLEN`s and every
//!   page of an `HSCAN` of `unacked`, values included, on every poll;
//! * **tags (now)**: `ReadPlan` as the poller runs it: the `LLEN`s and the delivery tags, each
//!   value read once (the first poll, not counted here).
//!
//! Prints a Markdown table; asserts nothing. Uses (and flushes) the given database: point it at a
//! scratch Redis.
//!
//!   cargo run --release --example bench_broker_cost -- redis://127.0.0.1:PORT/9

use std::time::{Duration, Instant};

use taskqueue_operator::broker::reader::{routing_key, InFlight, ReadPlan};
use taskqueue_operator::broker::unacked::{Streamed, Tags};
use taskqueue_operator::broker::{BrokerEndpoint, BrokerPool, DepthQuery};
use taskqueue_operator::crd::TransportOptions;

const QUEUES: usize = 1_000;

/// (messages held, bytes of each message's body)
const CASES: &[(usize, usize)] = &[
    (0, 0),
    (1_000, 1_000),
    (10_000, 1_000),
    (1_000, 100_000),
    (10_000, 100_000),
    (10, 10_000_000),
    (100, 10_000_000),
];

async fn info(c: &mut redis::aio::MultiplexedConnection) -> (u64, f64, u64) {
    let text: String = redis::cmd("INFO").arg("everything").query_async(c).await.unwrap();
    let field = |name: &str| -> f64 {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok()).unwrap_or(0.0)
    };
    let cpu = field("used_cpu_user") + field("used_cpu_sys");
    (field("total_net_output_bytes") as u64, cpu, text.len() as u64 + 16)
}

/// kombu's `unacked` value for a protocol 2 task with a body of `size` bytes.
fn message(tag: &str, queue: &str, size: usize) -> String {
    let body = "A".repeat(size);
    format!(
        r#"[{{"body": "{body}", "content-encoding": "utf-8", "content-type": "application/json", "headers": {{"lang": "py", "task": "app.t", "id": "{tag}", "eta": null, "retries": 0}}, "properties": {{"delivery_info": {{"exchange": "", "routing_key": "{queue}"}}, "priority": 0, "body_encoding": "base64", "delivery_tag": "{tag}"}}}}, "", "{queue}"]"#
    )
}

async fn fill(c: &mut redis::aio::MultiplexedConnection, held: usize, size: usize) {
    let _: () = redis::cmd("FLUSHDB").query_async(c).await.unwrap();
    let mut pipe = redis::pipe();
    for i in 0..QUEUES {
        pipe.lpush(format!("q{i}"), "m").ignore();
    }
    let _: () = pipe.query_async(c).await.unwrap();
    for chunk in (0..held).collect::<Vec<_>>().chunks((50_000_000 / size.max(1)).clamp(1, 1000)) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let tag = format!("{:08x}-0000-4000-8000-{:012x}", i, i);
            pipe.zadd("unacked_index", &tag, i as f64).ignore();
            pipe.hset("unacked", &tag, message(&tag, &format!("q{}", i % QUEUES), size)).ignore();
        }
        let _: () = pipe.query_async(c).await.unwrap();
    }
}

/// The read before this change: the LLENs, then HSCAN pages of `unacked` (1 000 per page, at
/// most 100), each value parsed for its routing key.
async fn hscan_read(c: &mut redis::aio::MultiplexedConnection, queries: &[DepthQuery]) -> usize {
    let mut pipe = redis::pipe();
    for q in queries {
        for (_, key) in q.keys() {
            pipe.llen(key);
        }
    }
    let _: Vec<i64> = pipe.query_async(c).await.unwrap();
    let (mut cursor, mut seen) = ("0".to_string(), 0);
    for _ in 0..100 {
        let (next, entries): (String, Vec<Vec<u8>>) =
            redis::cmd("HSCAN").arg("unacked").arg(&cursor).arg("COUNT").arg(1000).query_async(c).await.unwrap();
        seen += entries.iter().skip(1).step_by(2).filter_map(|v| routing_key(v)).count();
        if next == "0" {
            break;
        }
        cursor = next;
    }
    seen
}

async fn lists_read(c: &mut redis::aio::MultiplexedConnection, queries: &[DepthQuery]) {
    let mut pipe = redis::pipe();
    for q in queries {
        for (_, key) in q.keys() {
            pipe.llen(key);
        }
    }
    let _: Vec<i64> = pipe.query_async(c).await.unwrap();
}

struct Cost {
    bytes: u64,
    cpu_ms: f64,
    wall: Duration,
}

/// Redis's counters before some polls; `finish` gives the mean cost of one.
struct Probe {
    out: u64,
    cpu: f64,
    info_len: u64,
    at: Instant,
}

impl Probe {
    async fn start(admin: &mut redis::aio::MultiplexedConnection) -> Self {
        let (out, cpu, info_len) = info(admin).await;
        Self { out, cpu, info_len, at: Instant::now() }
    }

    async fn finish(self, admin: &mut redis::aio::MultiplexedConnection, polls: usize) -> Cost {
        let wall = self.at.elapsed() / polls as u32;
        let (out, cpu, _) = info(admin).await;
        // The first INFO's own reply is counted in the second's figure.
        Cost {
            bytes: (out - self.out).saturating_sub(self.info_len) / polls as u64,
            cpu_ms: (cpu - self.cpu) * 1000.0 / polls as f64,
            wall,
        }
    }
}

fn size(bytes: usize) -> String {
    match bytes {
        0 => "-".into(),
        b if b >= 1_000_000 => format!("{} MB", b / 1_000_000),
        b => format!("{} KB", b / 1_000),
    }
}

/// Bytes Redis sent, Redis CPU as % of a core at `pollInterval: 1s`, wall time of the poll.
fn row(c: &Cost) -> String {
    format!("{} B, {:.2} %, {:.1} ms", c.bytes, c.cpu_ms / 10.0, c.wall.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let url = std::env::args().nth(1).unwrap_or_else(|| "redis://127.0.0.1:6379/9".into());
    let endpoint = BrokerEndpoint::parse(&url).expect("broker URL");
    let pool = BrokerPool::new(Duration::from_secs(60));
    let (mut conn, addr) = pool.connection_at(&endpoint).await.expect("connect");
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut admin =
        redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection_with_config(&config).await.unwrap();
    let opts = TransportOptions::default();
    let queries: Vec<DepthQuery> = (0..QUEUES).map(|i| DepthQuery::new(&format!("q{i}"), &opts)).collect();
    let plan = ReadPlan::new(queries.clone());

    println!(
        "{QUEUES} queues (4 priority lists each). Per quiet poll: bytes Redis sent, Redis CPU (% of one core at \
         pollInterval 1s), wall time.\n"
    );
    println!("| held | message | lists only | HSCAN (before) | tags (now) | first poll (now) |");
    println!("|---:|---:|---|---|---|---|");
    for &(held, body) in CASES {
        fill(&mut admin, held, body).await;
        let polls = if held * body > 100_000_000 { 3 } else { 20 };
        let probe = Probe::start(&mut admin).await;
        for _ in 0..polls {
            lists_read(&mut conn, &queries).await;
        }
        let lists = probe.finish(&mut admin, polls).await;

        // No reply timeout: a poll of gigabytes takes seconds.
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut old = client.get_multiplexed_async_connection_with_config(&config).await.unwrap();
        let probe = Probe::start(&mut admin).await;
        for _ in 0..polls {
            hscan_read(&mut old, &queries).await;
        }
        let hscan = probe.finish(&mut admin, polls).await;

        // The first poll reads every value once; the polls after it are quiet.
        let mut tags = Tags::default();
        let mut bodies = Streamed::new(endpoint.clone(), addr.clone(), Duration::from_secs(60), Default::default());
        let mut costs = Vec::new();
        for n in [1, polls] {
            let probe = Probe::start(&mut admin).await;
            for _ in 0..n {
                let f = InFlight {
                    tags: &mut tags,
                    bodies: Some(&mut bodies),
                    budget: Duration::from_secs(600),
                    holders: None,
                };
                plan.read(&mut conn, "bench", f).await.unwrap();
            }
            costs.push(probe.finish(&mut admin, n).await);
        }
        let (first, now) = (&costs[0], &costs[1]);
        assert_eq!(tags.len(), held, "every held message is known");
        println!("| {held} | {} | {} | {} | {} | {} |", size(body), row(&lists), row(&hscan), row(now), row(first));
    }
    let _: () = redis::cmd("FLUSHDB").query_async(&mut admin).await.unwrap();
}
