//! One pipelined round trip: LLEN of every priority list of every queried queue.

use std::collections::BTreeMap;

use super::keys::DepthQuery;

/// Pending messages of one queue: kombu's own count (`Channel._size`), per priority step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueDepth {
    pub pending: i64,
    pub by_priority: BTreeMap<u8, i64>,
}

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
    if keyed.iter().all(Vec::is_empty) {
        return Ok(queries.iter().map(|_| Ok(QueueDepth::default())).collect());
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for (_, key) in keyed.iter().flatten() {
        pipe.llen(key);
    }
    let replies: Vec<redis::RedisResult<i64>> =
        pipe.query_async(conn).await.map_err(|e| ReadError::from_redis(endpoint, &e))?;
    let mut replies = replies.into_iter();
    let mut out = Vec::with_capacity(queries.len());
    for keys in keyed {
        let mut depth = Ok(QueueDepth::default());
        for (step, key) in keys {
            let reply = replies
                .next()
                .unwrap_or_else(|| Err(redis::RedisError::from((redis::ErrorKind::Client, "short pipeline reply"))));
            match (&mut depth, reply) {
                (Ok(d), Ok(n)) => {
                    d.pending += n;
                    d.by_priority.insert(step, n);
                }
                (Ok(_), Err(e)) if e.code() == Some("WRONGTYPE") => {
                    depth = Err(ReadError::WrongType {
                        key: String::from_utf8_lossy(&key).into_owned(),
                        cause: e.to_string(),
                    });
                }
                // Anything else (NOAUTH, NOPERM, ...) concerns the whole broker, not this queue.
                (_, Err(e)) if e.code() != Some("WRONGTYPE") => return Err(ReadError::from_redis(endpoint, &e)),
                _ => {}
            }
        }
        out.push(depth);
    }
    Ok(out)
}
