//! Broker read benchmark: time per tick and Redis round trips for 1 / 100 / 1 000 / 10 000
//! queues, one pipelined round trip for all of them (what the operator does) next to one round
//! trip per queue (what a per-queue scaler does); then the CPU one read costs this process, back
//! to back and spaced 2 s apart (as the poller reads at the default pollInterval). Prints
//! figures; asserts nothing.
//!
//!   cargo run --release --example bench_depth -- redis://127.0.0.1:6379/9
//!
//! Uses (and flushes) the given database: point it at a scratch Redis/db.

use std::time::{Duration, Instant};

use taskqueue_operator::broker::reader::{read_depths, InFlight, ReadPlan};
use taskqueue_operator::broker::unacked::Tags;
use taskqueue_operator::broker::{BrokerEndpoint, BrokerPool, DepthQuery};
use taskqueue_operator::crd::TransportOptions;

const ROUNDS: usize = 21;

/// CPU seconds this process has used (user + system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(") ").map(|(_, r)| r.split(' ').collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Fill `n` queues (one message each, every third also at priority step 6).
async fn fill(conn: &mut redis::aio::MultiplexedConnection, n: usize) {
    let _: () = redis::cmd("FLUSHDB").query_async(conn).await.unwrap();
    let mut fill = redis::pipe();
    for i in 0..n {
        fill.lpush(format!("q{i}"), "m").ignore();
        if i % 3 == 0 {
            fill.lpush(format!("q{i}\x06\x166"), "m").ignore();
        }
    }
    let _: () = fill.query_async(conn).await.unwrap();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let url = std::env::args().nth(1).unwrap_or_else(|| "redis://127.0.0.1:6379/9".into());
    let endpoint = BrokerEndpoint::parse(&url).expect("broker URL");
    let mut conn = BrokerPool::default().connection(&endpoint).await.expect("connect");
    let opts = TransportOptions::default();
    println!("{:>7} {:>22} {:>22} {:>10}", "queues", "pipelined p50/p95", "per-queue p50/p95", "trips");
    for n in [1usize, 100, 1_000, 10_000] {
        fill(&mut conn, n).await;
        let queries: Vec<DepthQuery> = (0..n).map(|i| DepthQuery::new(&format!("q{i}"), &opts)).collect();

        let mut pipelined = Vec::new();
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let depths = read_depths(&mut conn, "bench", &queries).await.unwrap();
            pipelined.push(t.elapsed());
            assert_eq!(depths.len(), n);
        }
        // Per-queue: one round trip per queue (still its priority lists in one pipeline each).
        let rounds = if n >= 10_000 { 5 } else { ROUNDS };
        let mut per_queue = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            for q in &queries {
                read_depths(&mut conn, "bench", std::slice::from_ref(q)).await.unwrap();
            }
            per_queue.push(t.elapsed());
        }
        pipelined.sort();
        per_queue.sort();
        println!(
            "{n:>7} {:>10.2?}/{:>10.2?} {:>10.2?}/{:>10.2?} {:>4} vs {n}",
            percentile(&pipelined, 0.5),
            percentile(&pipelined, 0.95),
            percentile(&per_queue, 0.5),
            percentile(&per_queue, 0.95),
            1
        );
    }

    // CPU per read with the plan built once (the poller's way), back to back and 2 s apart.
    println!("\n{:>7} {:>24} {:>24}", "queues", "CPU/read back to back", "CPU/read 2 s apart");
    for n in [2_000usize, 10_000] {
        fill(&mut conn, n).await;
        let plan = ReadPlan::new((0..n).map(|i| DepthQuery::new(&format!("q{i}"), &opts)).collect());
        let reads = 10;
        let cpu = |spacing: Duration| {
            let plan = &plan;
            let mut conn = conn.clone();
            async move {
                let c0 = cpu_seconds();
                let mut tags = Tags::default();
                for _ in 0..reads {
                    tokio::time::sleep(spacing).await;
                    let in_flight =
                        InFlight { tags: &mut tags, bodies: None, budget: Duration::from_secs(10), holders: None };
                    plan.read(&mut conn, "bench", in_flight).await.unwrap();
                }
                (cpu_seconds() - c0) * 1000.0 / reads as f64
            }
        };
        let back_to_back = cpu(Duration::ZERO).await;
        let spaced = cpu(Duration::from_secs(2)).await;
        println!("{n:>7} {back_to_back:>21.1} ms {spaced:>21.1} ms");
    }
    let _: () = redis::cmd("FLUSHDB").query_async(&mut conn).await.unwrap();
}
