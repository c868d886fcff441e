//! One pipelined round trip: LLEN of every priority list of every queried queue, plus the first
//! page of an HSCAN of kombu's `unacked` hash per key prefix (in-flight messages). Only a large
//! `unacked` hash costs further round trips, bounded per tick.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::keys::DepthQuery;

/// Pending messages of one queue: kombu's own count (`Channel._size`), per priority step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueDepth {
    pub pending: i64,
    pub by_priority: BTreeMap<u8, i64>,
    /// Entries of kombu's `unacked` hash for this queue: prefetched/reserved, `acks_late`
    /// running, and ETA/countdown messages a worker holds.
    pub in_flight: i64,
}

/// HSCAN page size, and the most pages read per prefix per tick (so 100 000 entries).
const SCAN_PAGE: usize = 1000;
const MAX_SCAN_PAGES: usize = 100;

/// Why the broker could not be read; the text is safe to publish (no credentials).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("broker URL: {0}")]
    Url(String),
    #[error("cannot reach {endpoint}: {cause}")]
    Unreachable { endpoint: String, cause: String },
    #[error("authentication to {endpoint} failed: {cause}; check the user and password in the broker URL Secret")]
    Auth { endpoint: String, cause: String },
    #[error("key {key:?} is not a list ({cause}); check spec.broker.transportOptions (globalKeyprefix, sep) against the app's broker_transport_options")]
    WrongType { key: String, cause: String },
    #[error("reading {endpoint} failed: {cause}")]
    Other { endpoint: String, cause: String },
}

impl ReadError {
    /// Short machine-readable reason for conditions and events.
    pub fn reason(&self) -> &'static str {
        match self {
            ReadError::Url(_) => "InvalidBrokerURL",
            ReadError::Unreachable { .. } => "BrokerUnreachable",
            ReadError::Auth { .. } => "BrokerAuthFailed",
            ReadError::WrongType { .. } => "WrongKeyType",
            ReadError::Other { .. } => "BrokerReadFailed",
        }
    }

    pub fn from_redis(endpoint: &str, e: &redis::RedisError) -> Self {
        let code = e.code().unwrap_or("");
        let cause = e.to_string();
        let endpoint = endpoint.to_string();
        if matches!(code, "NOAUTH" | "WRONGPASS" | "NOPERM") || e.kind() == redis::ErrorKind::AuthenticationFailed {
            ReadError::Auth { endpoint, cause }
        } else if e.is_connection_refusal() || e.is_timeout() || e.is_io_error() || e.is_connection_dropped() {
            ReadError::Unreachable { endpoint, cause }
        } else {
            ReadError::Other { endpoint, cause }
        }
    }
}

/// Read all `queries` in one pipeline. The outer error is the round trip failing (nothing is
/// known); an inner error is one queue whose key holds something other than a list.
pub async fn read_depths<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    endpoint: &str,
    queries: &[DepthQuery],
) -> Result<Vec<Result<QueueDepth, ReadError>>, ReadError> {
    let keyed: Vec<Vec<(u8, Vec<u8>)>> = queries.iter().map(DepthQuery::keys).collect();
    let prefixes: Vec<&str> = queries.iter().map(|q| q.prefix.as_str()).collect::<BTreeSet<_>>().into_iter().collect();
    let redis_err = |e: redis::RedisError| ReadError::from_redis(endpoint, &e);
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for (_, key) in keyed.iter().flatten() {
        pipe.llen(key);
    }
    for prefix in &prefixes {
        pipe.cmd("HSCAN").arg(format!("{prefix}unacked")).arg(0).arg("COUNT").arg(SCAN_PAGE);
    }
    if keyed.iter().all(Vec::is_empty) && prefixes.is_empty() {
        return Ok(Vec::new());
    }
    let replies: Vec<redis::RedisResult<redis::Value>> = pipe.query_async(conn).await.map_err(redis_err)?;
    let mut replies = replies.into_iter();
    let mut next = || {
        replies
            .next()
            .unwrap_or_else(|| Err(redis::RedisError::from((redis::ErrorKind::Client, "short pipeline reply"))))
    };
    let mut out = Vec::with_capacity(queries.len());
    for keys in &keyed {
        let mut depth = Ok(QueueDepth::default());
        for (step, key) in keys {
            let reply = next().and_then(|v| redis::from_redis_value::<i64>(v).map_err(redis::RedisError::from));
            match (&mut depth, reply) {
                (Ok(d), Ok(n)) => {
                    d.pending += n;
                    d.by_priority.insert(*step, n);
                }
                (Ok(_), Err(e)) if e.code() == Some("WRONGTYPE") => {
                    depth = Err(ReadError::WrongType {
                        key: String::from_utf8_lossy(key).into_owned(),
                        cause: e.to_string(),
                    });
                }
                // Anything else (NOAUTH, NOPERM, ...) concerns the whole broker, not this queue.
                (_, Err(e)) if e.code() != Some("WRONGTYPE") => return Err(redis_err(e)),
                _ => {}
            }
        }
        out.push(depth);
    }

    // In flight: count `unacked` entries by routing key (= queue with Celery's default publishing).
    let mut in_flight: HashMap<(&str, String), i64> = HashMap::new();
    for prefix in &prefixes {
        let hash = format!("{prefix}unacked");
        let mut page = next();
        for _ in 0..MAX_SCAN_PAGES {
            let (cursor, entries): (String, Vec<Vec<u8>>) = match page {
                Ok(v) => redis::from_redis_value(v).map_err(|e| redis_err(e.into()))?,
                Err(e) if e.code() == Some("WRONGTYPE") => {
                    return Err(ReadError::WrongType { key: hash, cause: e.to_string() });
                }
                Err(e) => return Err(redis_err(e)),
            };
            for value in entries.iter().skip(1).step_by(2) {
                if let Some(queue) = routing_key(value) {
                    *in_flight.entry((prefix, queue)).or_default() += 1;
                }
            }
            if cursor == "0" {
                break;
            }
            page = redis::cmd("HSCAN").arg(&hash).arg(&cursor).arg("COUNT").arg(SCAN_PAGE).query_async(conn).await;
        }
    }
    for (q, d) in queries.iter().zip(out.iter_mut()) {
        if let Ok(d) = d {
            d.in_flight = in_flight.get(&(q.prefix.as_str(), q.queue.clone())).copied().unwrap_or(0);
        }
    }
    Ok(out)
}

/// The routing key of one `unacked` value, `[message, exchange, routing_key]` (kombu's layout);
/// None for a value in another format.
pub fn routing_key(value: &[u8]) -> Option<String> {
    let (_, _, rk): (serde::de::IgnoredAny, serde::de::IgnoredAny, String) = serde_json::from_slice(value).ok()?;
    Some(rk)
}
