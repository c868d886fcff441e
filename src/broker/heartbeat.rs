//! Celery worker heartbeats, read from the broker's pub/sub (reference §7).
//!
//! Every worker publishes `worker-online`, then `worker-heartbeat` every `freq` seconds (2 s by
//! default, even without `-E`), and `worker-offline` at a warm shutdown, on the channels
//! `<prefix>/<db>.celeryev/worker.{online,heartbeat,offline}`. Each event carries the worker's
//! `hostname` (`<nodeName>@<pod name>` for our Deployments) and `active`, its running tasks.
//! What they say of each worker is kept in `workers`.
//!
//! The same subscription carries the broker's keyevent notifications for list pushes
//! (`__keyevent@<db>__:lpush` / `rpush`, sent when `notify-keyspace-events` contains `E` and
//! `l`): each names the key pushed to, so a burst is seen at once instead of at the next poll.
//!
//! Subscribing is a read: nothing is published and no key is written, and the broker's
//! configuration is never changed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use tracing::{debug, warn};

use super::dial::{dial_bounded, rejected_or};
use super::pool::address;
use super::resp::Limits;
use super::url::BrokerEndpoint;
pub use super::workers::{SharedWorkers, WorkerEvent, Workers};

/// The three worker event channels for a key prefix and database.
pub fn channels(prefix: &str, db: i64) -> Vec<String> {
    ["online", "heartbeat", "offline"].iter().map(|e| format!("{prefix}/{db}.celeryev/worker.{e}")).collect()
}

/// Decode a kombu message envelope carrying a worker event (JSON, body base64 or inline).
pub fn parse_event(payload: &[u8]) -> Option<WorkerEvent> {
    let envelope: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let body = envelope.get("body")?;
    let event: serde_json::Value = match body {
        serde_json::Value::String(s) => {
            let base64 = envelope.pointer("/properties/body_encoding").and_then(|e| e.as_str()) == Some("base64");
            if base64 {
                serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(s).ok()?).ok()?
            } else {
                serde_json::from_str(s).ok()?
            }
        }
        other => other.clone(),
    };
    let hostname = event.get("hostname")?.as_str()?.to_string();
    match event.get("type")?.as_str()? {
        "worker-online" | "worker-heartbeat" => {
            let active = event.get("active").and_then(|a| a.as_i64()).unwrap_or(0);
            let freq = event.get("freq").and_then(|f| f.as_f64()).filter(|f| f.is_finite() && *f > 0.0).unwrap_or(2.0);
            let freq = Duration::from_secs_f64(freq.min(3600.0));
            let pid = event.get("pid").and_then(|p| p.as_i64());
            let online = event.get("type").and_then(|t| t.as_str()) == Some("worker-online");
            let processed = event.get("processed").and_then(|p| p.as_i64()).filter(|p| *p >= 0);
            Some(WorkerEvent::Alive { hostname, active, freq, pid, online, processed })
        }
        "worker-offline" => Some(WorkerEvent::Offline { hostname }),
        _ => None,
    }
}

/// The keyevent channels of list pushes in database `db` (kombu publishes with LPUSH; restores
/// of unacked messages use RPUSH/LPUSH too).
pub fn push_channels(db: i64) -> [String; 2] {
    [format!("__keyevent@{db}__:lpush"), format!("__keyevent@{db}__:rpush")]
}

/// Whether a `notify-keyspace-events` value sends keyevent notifications for list commands:
/// `E` and `l` (or `A`, which includes `l`).
pub fn keyevents_on(flags: &str) -> bool {
    flags.contains('E') && (flags.contains('l') || flags.contains('A'))
}

/// When the last list-push notification of one subscription arrived.
pub type SharedPush = Arc<Mutex<Option<Instant>>>;

/// Called with the key of each list push the broker notifies.
pub type PushHook = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Resubscribe after this long without any message.
const SILENCE: Duration = Duration::from_secs(60);

/// Subscribe to the worker channels of `prefixes` on one broker and keep `workers` current,
/// reconnecting (with backoff) until the task is aborted.
pub async fn subscribe(
    endpoint: BrokerEndpoint,
    prefixes: Vec<String>,
    workers: SharedWorkers,
    push: (SharedPush, PushHook),
    timeout: Duration,
    (limits, received): (Limits, Counter),
) {
    const FIRST: Duration = Duration::from_secs(1);
    let mut backoff = FIRST;
    loop {
        match listen(&endpoint, &prefixes, &workers, &push, timeout, (limits, &received)).await {
            Ok(()) => {
                debug!(broker = %endpoint, "heartbeat subscription ended; resubscribing");
                backoff = FIRST;
            }
            Err(e) => warn!(broker = %endpoint, error = %e, "heartbeat subscription failed; retrying in {backoff:?}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn listen(
    endpoint: &BrokerEndpoint,
    prefixes: &[String],
    workers: &SharedWorkers,
    (state, on_push): &(SharedPush, PushHook),
    timeout: Duration,
    (limits, received): (Limits, &Counter),
) -> Result<(), String> {
    let addr = address(endpoint, timeout, limits).await.map_err(|e| e.to_string())?;
    let d = dial_bounded(endpoint, (&addr.0, addr.1), timeout, limits, received.clone())
        .await
        .map_err(|e| e.to_string())?;
    let rejected = d.rejected.clone();
    let shown = endpoint.to_string();
    let mut pubsub = tokio::time::timeout(timeout, redis::aio::PubSub::new(&d.info, d.stream))
        .await
        .map_err(|_| format!("no reply within {timeout:?}"))?
        .map_err(|e| rejected_or(&rejected, &shown, &e).to_string())?;
    for prefix in prefixes {
        for channel in channels(prefix, endpoint.db) {
            pubsub.subscribe(&channel).await.map_err(|e| e.to_string())?;
        }
    }
    let pushes = push_channels(endpoint.db);
    for channel in &pushes {
        pubsub.subscribe(channel).await.map_err(|e| e.to_string())?;
    }
    // Workers first heard from now on, within two heartbeats, may have been running all along.
    workers.lock().expect("lock").listening(Instant::now());
    let mut messages = pubsub.on_message();
    // A silent minute: no worker is publishing, or the connection died without a reset (a
    // blackholed broker). Either way a fresh subscription is cheap and rules out the latter.
    while let Ok(Some(msg)) = tokio::time::timeout(SILENCE, messages.next()).await {
        if rejected.lock().expect("lock").is_some() {
            break;
        }
        if pushes.iter().any(|c| c.as_bytes() == msg.get_channel_name().as_bytes()) {
            *state.lock().expect("lock") = Some(Instant::now());
            on_push(msg.get_payload_bytes());
        } else if let Some(event) = parse_event(msg.get_payload_bytes()) {
            workers.lock().expect("lock").apply(event, Instant::now());
        }
    }
    // A message over the bounds closed the subscription: say so, then resubscribe.
    let closed_by = rejected.lock().expect("lock").take();
    match closed_by {
        Some(r) => Err(super::ReadError::rejected(&shown, &r).to_string()),
        None => Ok(()),
    }
}

/// `CONFIG GET notify-keyspace-events` on `conn`: whether list pushes are notified; None when
/// the broker user may not ask (a read-only ACL user need not: a notification seen says it too).
pub async fn notifications_configured<C: redis::aio::ConnectionLike>(conn: &mut C) -> Option<bool> {
    let reply: Vec<String> =
        redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").query_async(conn).await.ok()?;
    Some(keyevents_on(reply.get(1).map_or("", String::as_str)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(event: serde_json::Value) -> Vec<u8> {
        let body = base64::engine::general_purpose::STANDARD.encode(event.to_string());
        serde_json::json!({
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"hostname": "demo@pod-a"},
            "properties": {"body_encoding": "base64", "delivery_info": {"exchange": "celeryev", "routing_key": "worker.heartbeat"}}
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn list_pushes_are_notified_with_e_and_l() {
        for (flags, on) in
            [("", false), ("El", true), ("AE", true), ("KEA", true), ("Kl", false), ("Ex", false), ("lE$", true)]
        {
            assert_eq!(keyevents_on(flags), on, "{flags:?}");
        }
        assert_eq!(push_channels(3), ["__keyevent@3__:lpush", "__keyevent@3__:rpush"]);
    }

    #[test]
    fn channels_carry_prefix_and_db() {
        assert_eq!(
            channels("pfx:", 7),
            ["pfx:/7.celeryev/worker.online", "pfx:/7.celeryev/worker.heartbeat", "pfx:/7.celeryev/worker.offline"]
        );
    }

    #[test]
    fn decodes_celery_heartbeats() {
        let hb = envelope(serde_json::json!({
            "hostname": "demo@pod-a", "utcoffset": 0, "pid": 12, "clock": 30, "freq": 2.0, "active": 3,
            "processed": 10, "loadavg": [0.1, 0.1, 0.1], "sw_ident": "py-celery", "sw_ver": "5.7.0",
            "sw_sys": "Linux", "timestamp": 1.0, "type": "worker-heartbeat"
        }));
        assert_eq!(
            parse_event(&hb),
            Some(WorkerEvent::Alive {
                hostname: "demo@pod-a".into(),
                active: 3,
                freq: Duration::from_secs(2),
                pid: Some(12),
                online: false,
                processed: Some(10)
            })
        );
        let off = envelope(serde_json::json!({"hostname": "demo@pod-a", "type": "worker-offline", "freq": 2.0}));
        assert_eq!(parse_event(&off), Some(WorkerEvent::Offline { hostname: "demo@pod-a".into() }));
        assert_eq!(parse_event(b"not json"), None);
        assert_eq!(parse_event(&envelope(serde_json::json!({"hostname": "x", "type": "task-sent"}))), None);
    }
}
