//! Leader election with two real operator processes against the real API server: exactly one
//! leader at every sample, the standby writes nothing (by its own write counter, and no Event
//! outside a leadership term), and after a SIGKILL of the leader the
//! other takes over and scaling goes on. Five kills; the takeover times go to
//! docs/reliability.md. Marked `#[ignore]`: `make test` runs it.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use support::*;
use taskqueue_operator::controller::deployment::MANAGER;

/// One operator process with leader election on, named like a pod.
struct Replica {
    name: String,
    port: u16,
    process: ChildGuard,
}

impl Replica {
    fn start(ns: &str, name: &str) -> Self {
        Self::release(ns, ns, "taskqueue-operator", name)
    }

    /// A replica of release `lease` installed in `ops`, watching `watch`.
    fn release(watch: &str, ops: &str, lease: &str, name: &str) -> Self {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("tq-election-{name}-{port}.log"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_taskqueue-operator"))
            .args([
                "run",
                "--namespace",
                watch,
                "--lease-namespace",
                ops,
                "--lease-name",
                lease,
                "--broker-timeout",
                "1s",
            ])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .env("POD_NAME", name)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Replica { name: name.into(), port, process: ChildGuard(child) }
    }

    /// Every API write this replica made (`taskqueue_api_writes_total`, all kinds). Each kind's
    /// series must be on its /metrics: a missing series fails here rather than reading as 0.
    fn writes(&self) -> f64 {
        let (code, body) = http_get(self.port, "/metrics");
        assert_eq!(code, 200, "{}: /metrics", self.name);
        api_writes(&body)
    }

    /// `taskqueue_leader` on its /metrics; None while it is not serving.
    fn leading(&self) -> Option<bool> {
        std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        let (code, body) = http_get(self.port, "/metrics");
        (code == 200).then(|| metric(&body, "taskqueue_leader") == 1.0)
    }
}

async fn holder(client: &kube::Client, ns: &str) -> Option<String> {
    holder_of(client, ns, "taskqueue-operator").await
}

async fn holder_of(client: &kube::Client, ns: &str, lease: &str) -> Option<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), ns).get_opt(lease).await.ok()??;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}

/// The one replica that says it leads, once every replica answers and the Lease names it too.
async fn the_leader(client: &kube::Client, ns: &str, replicas: &[Replica]) -> usize {
    wait_for("exactly one leader", Duration::from_secs(60), || async {
        let answers: Vec<bool> = replicas.iter().map(Replica::leading).collect::<Option<_>>()?;
        let leading: Vec<usize> = (0..replicas.len()).filter(|&i| answers[i]).collect();
        let [one] = leading[..] else { return None };
        (holder(client, ns).await.as_deref() == Some(replicas[one].name.as_str())).then_some(one)
    })
    .await
}

/// Two releases installed in one namespace (one per team, each watching its own): each elects its
/// leader on a Lease named after it, so both lead and both teams' pools scale.
#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn two_releases_in_one_namespace_each_lead_on_their_own_lease() {
    let client = client().await;
    ensure_crd(&client).await;
    let ops = namespace(&client, "releases").await;
    let redis = Redis::start().await;
    let mut teams = Vec::new();
    for team in ["team-a", "team-b"] {
        let work = namespace(&client, team).await;
        broker_secret(&client, &work, &redis.url()).await;
        create_taskqueue(&client, &work, pool("work", &format!("{team}_q"), json!({"pollInterval": "500ms"}))).await;
        let replica = Replica::release(&work, &ops, team, &format!("{team}-0"));
        teams.push((team, work, replica));
    }
    for (team, _, replica) in &teams {
        wait_for(&format!("{team} leads on Lease {team}"), Duration::from_secs(60), || async {
            let leads = replica.leading() == Some(true);
            (leads && holder_of(&client, &ops, team).await.as_deref() == Some(replica.name.as_str())).then_some(())
        })
        .await;
    }
    for (team, work, _) in &teams {
        lpush(&redis.url(), &format!("{team}_q"), 4).await;
        wait_replicas(&client, work, "work", 1).await;
    }
    for (_, work, _) in &teams {
        delete_namespace(&client, work).await;
    }
    delete_namespace(&client, &ops).await;
}

#[tokio::test]
#[ignore = "needs the local stack: make test"]
async fn one_leader_at_a_time_and_a_standby_takes_over_after_a_sigkill() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = namespace(&client, "elect").await;
    let redis = Redis::start().await;
    broker_secret(&client, &ns, &redis.url()).await;
    let scaling = json!({"maxReplicas": 10, "pollInterval": "500ms", "scaleDown": {"stabilizationWindow": "1s"}});
    create_taskqueue(&client, &ns, pool("work", "work_q", scaling)).await;
    let started = jiff::Timestamp::now();
    let mut replicas = vec![Replica::start(&ns, "tqo-0"), Replica::start(&ns, "tqo-1")];
    let mut leader = the_leader(&client, &ns, &replicas).await;
    // Who led when (wall clock), to check every Event against: a term starts at the latest when
    // the previous leader died, and ends when it is killed.
    let mut terms: Vec<(String, jiff::Timestamp, Option<jiff::Timestamp>)> =
        vec![(replicas[leader].name.clone(), started, None)];

    lpush(&redis.url(), "work_q", 4).await;
    wait_replicas(&client, &ns, "work", 1).await;
    // Exactly one leader at every sample, and it is the one the Lease names.
    for _ in 0..10 {
        let leading: Vec<Option<bool>> = replicas.iter().map(Replica::leading).collect();
        assert_eq!(leading.iter().filter(|l| **l == Some(true)).count(), 1, "{leading:?}");
        assert_eq!(holder(&client, &ns).await.as_deref(), Some(replicas[leader].name.as_str()));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let mut takeovers = Vec::new();
    for kill in 1..=5 {
        // What each replica wrote, by its own count: the leader, and a standby nothing at all.
        let standby = usize::from(leader == 0);
        assert!(replicas[leader].writes() > 0.0, "the leader's writes are counted");
        assert_eq!(replicas[standby].writes(), 0.0, "{} wrote as a standby", replicas[standby].name);
        let killed = replicas[leader].name.clone();
        replicas[leader].process.0.kill().unwrap(); // SIGKILL: no release, the Lease must expire
        let _ = replicas[leader].process.0.wait();
        let (at, died) = (Instant::now(), jiff::Timestamp::now());
        terms.last_mut().unwrap().2 = Some(died);
        let survivor = usize::from(leader == 0); // two replicas run at a time
        wait_for("the standby to take over", Duration::from_secs(60), || async {
            (replicas[survivor].leading() == Some(true)).then_some(())
        })
        .await;
        let took = at.elapsed();
        takeovers.push(took);
        terms.push((replicas[survivor].name.clone(), died, None));
        assert_ne!(holder(&client, &ns).await.as_deref(), Some(killed.as_str()));
        // Scaling goes on under the new leader: 4 more messages, one more replica.
        lpush(&redis.url(), "work_q", 4).await;
        wait_replicas(&client, &ns, "work", kill + 1).await;
        // A fresh standby joins, as a restarted pod would.
        replicas.remove(leader);
        replicas.push(Replica::start(&ns, &format!("tqo-{}", kill + 1)));
        leader = the_leader(&client, &ns, &replicas).await;
        assert_eq!(replicas[leader].name, terms.last().unwrap().0, "the new standby does not take the Lease");
    }

    // No Event from a replica outside its term: a standby wrote none.
    let mut events = events_of(&client, &ns, "work").await;
    events.retain(|e| e.reporting_controller.as_deref() == Some(MANAGER)); // not the Deployment's own
    assert!(events.len() >= 6, "Created and one ScaledUp per term: {events:?}");
    for e in &events {
        let by = e.reporting_instance.clone().unwrap_or_default();
        let when = e.event_time.as_ref().unwrap().0;
        let in_term = terms.iter().any(|(name, from, to)| *name == by && when >= *from && to.is_none_or(|t| when <= t));
        assert!(in_term, "event {:?} by {by} at {when} outside its leadership terms {terms:?}", e.reason);
    }
    // The last standby, which never led: no write.
    let standby = usize::from(leader == 0);
    assert_eq!(replicas[standby].writes(), 0.0, "{} wrote as a standby", replicas[standby].name);

    let secs: Vec<f64> = takeovers.iter().map(Duration::as_secs_f64).collect();
    let max = secs.iter().copied().fold(0.0, f64::max);
    let mean = secs.iter().sum::<f64>() / secs.len() as f64;
    let list: Vec<String> = secs.iter().map(|s| format!("{s:.1}")).collect();
    support::docs::measured(
        "docs/reliability.md",
        "election",
        &format!(
            "Two operator processes, the leader SIGKILLed 5 times (lease 15 s, renew deadline 10 s, retry 2 s), \
             measured from the kill to the standby's `taskqueue_leader` 1: {} s (mean {mean:.1} s, max {max:.1} s). \
             After each takeover the new leader scaled the pool one step further.\n",
            list.join(", ")
        ),
    );
    drop(replicas);
    delete_namespace(&client, &ns).await;
}
