//! One pipelined round trip: LLEN of every priority list of every queried queue, plus the
//! delivery tags in kombu's `unacked_index` per key prefix (in-flight messages). Only tags not
//! seen before cost more: their values are read once (see `unacked`).

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use base64::Engine;
use tracing::warn;

use super::keys::DepthQuery;
use super::unacked::{Bodies, Fetched, Held, Tags, TAG_PAGE, TAG_PAGES};

/// Pending messages of one queue: kombu's own count (`Channel._size`), per priority step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueDepth {
    pub pending: i64,
    /// (step, length) of each priority list, in the configured step order.
    pub by_priority: Vec<(u8, i64)>,
    /// Entries of kombu's `unacked` hash for this queue: prefetched/reserved, `acks_late`
    /// running, and ETA/countdown messages a worker holds.
    pub in_flight: i64,
    /// The ETAs (milliseconds since the epoch, ascending) of the `in_flight` entries that carry
    /// one: whether each is demand or scheduled for later depends on the time of the decision.
    pub etas: Vec<i64>,
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
    #[error(
        "{endpoint} sent {cause}; the connection was closed. A Redis broker's replies to the operator's reads are \
         small: check that the broker URL names the Celery broker (raise --max-broker-reply only if it does)"
    )]
    Rejected { endpoint: String, cause: String },
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
            ReadError::Rejected { .. } => "BrokerReplyRejected",
        }
    }

    /// The broker sent a reply over the bounds (see `resp`).
    pub fn rejected(endpoint: &str, rejected: &super::resp::Rejected) -> Self {
        ReadError::Rejected { endpoint: endpoint.to_string(), cause: rejected.to_string() }
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

/// Read all `queries` in one pipeline (see [`ReadPlan`]), the values of unacked messages over
/// the same connection (tests; the operator streams them, see `unacked::Streamed`).
pub async fn read_depths<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    endpoint: &str,
    queries: &[DepthQuery],
) -> Result<Vec<Result<QueueDepth, ReadError>>, ReadError> {
    let mut tags = Tags::default();
    let in_flight = InFlight { tags: &mut tags, bodies: None, budget: Duration::from_secs(3600) };
    ReadPlan::new(queries.to_vec()).read(conn, endpoint, in_flight).await
}

/// What a read knows and uses about in-flight messages: the tags seen so far, where new values
/// come from (None: the read's own connection), and how long reading them may take. Past the
/// budget the lists are still published; the values not read yet are read next time.
pub struct InFlight<'a> {
    pub tags: &'a mut Tags,
    pub bodies: Option<&'a mut dyn Bodies>,
    pub budget: Duration,
}

/// One read of a fixed set of queries, built once and sent as often as the set stays the same:
/// an LLEN per priority list of every queue, then per key prefix the size and the pages of
/// kombu's `unacked_index` (delivery tags only). A poller tick of 10 000 queues then formats no
/// key and builds no command (doing both on every tick was most of a quiet operator's CPU).
pub struct ReadPlan {
    queries: Vec<DepthQuery>,
    prefixes: Vec<String>,
    pipe: redis::Pipeline,
}

impl ReadPlan {
    pub fn new(queries: Vec<DepthQuery>) -> Self {
        let prefixes: Vec<String> =
            queries.iter().map(|q| q.prefix.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for q in &queries {
            for (_, key) in q.keys() {
                pipe.llen(key);
            }
        }
        for prefix in &prefixes {
            let index = format!("{prefix}unacked_index");
            pipe.cmd("ZCARD").arg(&index);
            for page in 0..TAG_PAGES {
                pipe.cmd("ZRANGE").arg(&index).arg(page * TAG_PAGE).arg((page + 1) * TAG_PAGE - 1);
            }
        }
        Self { queries, prefixes, pipe }
    }

    /// The outer error is the round trip failing (nothing is known); an inner error is one queue
    /// whose key holds something other than a list.
    pub async fn read<C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
        endpoint: &str,
        in_flight: InFlight<'_>,
    ) -> Result<Vec<Result<QueueDepth, ReadError>>, ReadError> {
        let (queries, prefixes) = (&self.queries, &self.prefixes);
        let redis_err = |e: redis::RedisError| ReadError::from_redis(endpoint, &e);
        if queries.iter().all(|q| q.steps.is_empty()) && prefixes.is_empty() {
            return Ok(Vec::new());
        }
        // Taken as one array: each command's reply or error, without another vector of results.
        let replies = match self.pipe.query_async(conn).await.map_err(redis_err)? {
            redis::Value::Array(replies) => replies,
            other => vec![other],
        };
        let mut replies = replies.into_iter();
        let mut next = || match replies.next() {
            Some(redis::Value::ServerError(e)) => Err(redis::RedisError::from(e)),
            Some(reply) => Ok(reply),
            None => Err(redis::RedisError::from((redis::ErrorKind::Client, "short pipeline reply"))),
        };
        let mut out = Vec::with_capacity(queries.len());
        for q in queries {
            let mut depth = Ok(QueueDepth { by_priority: Vec::with_capacity(q.steps.len()), ..QueueDepth::default() });
            for &step in &q.steps {
                let reply = next().and_then(|v| redis::from_redis_value::<i64>(v).map_err(redis::RedisError::from));
                match (&mut depth, reply) {
                    (Ok(d), Ok(n)) => {
                        d.pending += n;
                        d.by_priority.push((step, n));
                    }
                    (Ok(_), Err(e)) if e.code() == Some("WRONGTYPE") => {
                        depth = Err(ReadError::WrongType {
                            key: String::from_utf8_lossy(&q.key(step)).into_owned(),
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

        // In flight: the tags listed now, the values of the new ones read once.
        let InFlight { tags, mut bodies, budget } = in_flight;
        let deadline = tokio::time::Instant::now() + budget;
        tags.retain_prefixes(prefixes);
        for prefix in prefixes {
            let index = format!("{prefix}unacked_index");
            let listed = read_tags(&mut next, &index).map_err(|e| match e {
                TagsError::Redis(e) => redis_err(e),
                TagsError::WrongType(cause) => ReadError::WrongType { key: index.clone(), cause },
            })?;
            if listed.total > listed.tags.len() as i64 {
                warn!(
                    broker = endpoint,
                    "{index} holds {} tags; only the first {} are read each tick",
                    listed.total,
                    listed.tags.len()
                );
            }
            let new = tags.update(prefix, &listed.tags);
            if new.is_empty() {
                continue;
            }
            let hash = format!("{prefix}unacked");
            let fetch = async {
                match bodies.as_deref_mut() {
                    Some(b) => b.fetch(&hash, &new).await,
                    None => hget_each(conn, endpoint, &hash, &new).await,
                }
            };
            match tokio::time::timeout_at(deadline, fetch).await {
                Ok(Ok(values)) => {
                    for (tag, value) in new.into_iter().zip(values) {
                        match value {
                            Fetched::Gone => {}
                            Fetched::Foreign => tags.insert(prefix, tag, None),
                            Fetched::Held(h) => tags.insert(prefix, tag, Some(h)),
                        }
                    }
                }
                Ok(Err(e)) => warn!(broker = endpoint, error = %e, "{} new unacked messages not read yet", new.len()),
                Err(_) => warn!(broker = endpoint, "{} new unacked messages not read within {budget:?}", new.len()),
            }
        }
        count_in_flight(queries, &mut out, tags);
        Ok(out)
    }
}

/// Count each queue's held messages and collect their ETAs. A message belongs to its routing
/// key's queue (Celery's default publishing: exchange "", routing key = queue).
fn count_in_flight(queries: &[DepthQuery], out: &mut [Result<QueueDepth, ReadError>], tags: &Tags) {
    let mut by_queue: HashMap<(&str, &str), (i64, Vec<i64>)> = HashMap::new();
    for prefix in queries.iter().map(|q| q.prefix.as_str()).collect::<BTreeSet<_>>() {
        for held in tags.held(prefix) {
            let (count, etas) = by_queue.entry((prefix, held.routing_key.as_str())).or_default();
            *count += 1;
            etas.extend(held.eta);
        }
    }
    for (q, d) in queries.iter().zip(out.iter_mut()) {
        if let (Ok(d), Some((count, etas))) = (d, by_queue.get(&(q.prefix.as_str(), q.queue.as_str()))) {
            d.in_flight = *count;
            d.etas.clone_from(etas);
            d.etas.sort_unstable();
        }
    }
}

struct Listed {
    total: i64,
    tags: HashSet<Vec<u8>>,
}

enum TagsError {
    Redis(redis::RedisError),
    WrongType(String),
}

/// The ZCARD and ZRANGE pages of one prefix's `unacked_index`, as a set (a tag listed on two
/// pages, because the index changed between them, counts once).
fn read_tags(next: &mut impl FnMut() -> redis::RedisResult<redis::Value>, index: &str) -> Result<Listed, TagsError> {
    let wrong = |e: redis::RedisError| {
        if e.code() == Some("WRONGTYPE") {
            TagsError::WrongType(format!("{e}; kombu keeps a sorted set of delivery tags under {index:?}"))
        } else {
            TagsError::Redis(e)
        }
    };
    let total: i64 = next().and_then(|v| Ok(redis::from_redis_value(v)?)).map_err(wrong)?;
    let mut tags = HashSet::new();
    for _ in 0..TAG_PAGES {
        let page: Vec<Vec<u8>> = next().and_then(|v| Ok(redis::from_redis_value(v)?)).map_err(wrong)?;
        tags.extend(page);
    }
    Ok(Listed { total, tags })
}

/// `HGET` of each tag over `conn`, whole values (tests and small tools; see [`read_depths`]).
async fn hget_each<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    endpoint: &str,
    hash: &str,
    tags: &[Vec<u8>],
) -> Result<Vec<Fetched>, ReadError> {
    let mut pipe = redis::pipe();
    for tag in tags {
        pipe.cmd("HGET").arg(hash).arg(tag);
    }
    let values: Vec<Option<Vec<u8>>> = pipe.query_async(conn).await.map_err(|e| ReadError::from_redis(endpoint, &e))?;
    Ok(values
        .into_iter()
        .map(|v| match v {
            None => Fetched::Gone,
            Some(v) => Held::from_value(&v).map_or(Fetched::Foreign, Fetched::Held),
        })
        .collect())
}

/// The routing key of one `unacked` value, `[message, exchange, routing_key]` (kombu's layout);
/// None for a value in another format.
pub fn routing_key(value: &[u8]) -> Option<String> {
    let (_, _, rk): (serde::de::IgnoredAny, serde::de::IgnoredAny, String) = serde_json::from_slice(value).ok()?;
    Some(rk)
}

/// The ETA of one `unacked` value, in milliseconds since the epoch; None when the task has none
/// or the value is not a Celery task message we can read. Celery protocol 2 carries it in
/// `headers.eta`; protocol 1 in the JSON body (base64-encoded by kombu's Redis transport). A
/// timestamp without an offset is read as UTC (Celery's default `enable_utc`). Bodies in other
/// serializers (pickle, msgpack, yaml) are not decoded: such tasks count as in flight.
pub fn eta_millis(value: &[u8]) -> Option<i64> {
    let (message, _, _): (Message<'_>, serde::de::IgnoredAny, serde::de::IgnoredAny) =
        serde_json::from_slice(value).ok()?;
    let eta = match &message.headers {
        // Protocol 2: the headers name the task.
        Some(h) if h.task.is_some() => h.eta.clone()?,
        _ => message.protocol_1_eta()?,
    };
    parse_eta(&eta)
}

/// The parts of kombu's message envelope that can hold an ETA.
#[derive(serde::Deserialize)]
struct Message<'a> {
    #[serde(default, borrow)]
    headers: Option<Headers<'a>>,
    #[serde(default, borrow)]
    body: Option<Cow<'a, str>>,
    #[serde(default, borrow, rename = "content-type")]
    content_type: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    properties: Option<Properties<'a>>,
}

#[derive(serde::Deserialize)]
struct Headers<'a> {
    #[serde(default, borrow)]
    task: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    eta: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct Properties<'a> {
    #[serde(default, borrow)]
    body_encoding: Option<Cow<'a, str>>,
}

/// Protocol 1's task body: `{"task": ..., "id": ..., "eta": ...}`.
#[derive(serde::Deserialize)]
struct BodyV1 {
    #[allow(dead_code)]
    task: String,
    #[serde(default)]
    eta: Option<String>,
}

impl Message<'_> {
    fn protocol_1_eta(&self) -> Option<Cow<'_, str>> {
        if self.content_type.as_deref() != Some("application/json") {
            return None;
        }
        let body = self.body.as_deref()?;
        let encoding = self.properties.as_ref().and_then(|p| p.body_encoding.as_deref());
        let json: Vec<u8> = match encoding {
            Some("base64") => base64::engine::general_purpose::STANDARD.decode(body).ok()?,
            None => body.as_bytes().to_vec(),
            Some(_) => return None,
        };
        let body: BodyV1 = serde_json::from_slice(&json).ok()?;
        body.eta.map(Cow::Owned)
    }
}

/// An ISO 8601 timestamp as Celery writes it (`2026-12-01T18:03:50.162849+00:00`); without an
/// offset, UTC.
pub(crate) fn parse_eta(text: &str) -> Option<i64> {
    if let Ok(t) = text.parse::<jiff::Timestamp>() {
        return Some(t.as_millisecond());
    }
    let civil: jiff::civil::DateTime = text.parse().ok()?;
    civil.to_zoned(jiff::tz::TimeZone::UTC).ok().map(|z| z.timestamp().as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real messages from Celery 5.7 (`apply_async(countdown=3600)` and a plain one), with
    /// `task_protocol` 2 and 1, as a worker stores them in `unacked`.
    const V2_ETA: &str = r#"{"body": "W1sxXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"lang": "py", "task": "app.worker.tasks.urgent.page_oncall", "id": "73d2681b-49a3-4db9-b085-33e05af98f2d", "shadow": null, "eta": "2026-12-01T18:03:50.162849+00:00", "expires": null, "retries": 0}, "properties": {"delivery_info": {"exchange": "", "routing_key": "etaq"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "634e389c"}}"#;
    const V2_NOW: &str = r#"{"body": "W1syXSwge30sIHt9XQ==", "content-type": "application/json", "headers": {"lang": "py", "task": "t", "id": "d76a", "eta": null}, "properties": {"body_encoding": "base64"}}"#;
    const V1_ETA: &str = r#"{"body": "eyJ0YXNrIjogImFwcC53b3JrZXIudGFza3MudXJnZW50LnBhZ2Vfb25jYWxsIiwgImlkIjogIjE2YmRlZjU0LTM1ZjAtNDE2Yy05NGE2LTM0MDliYjVlNjJiMSIsICJhcmdzIjogWzFdLCAia3dhcmdzIjoge30sICJncm91cCI6IG51bGwsICJncm91cF9pbmRleCI6IG51bGwsICJyZXRyaWVzIjogMCwgImV0YSI6ICIyMDI2LTEyLTAxVDE4OjAzOjUwLjM0Njg4NyswMDowMCIsICJleHBpcmVzIjogbnVsbCwgInV0YyI6IHRydWUsICJjYWxsYmFja3MiOiBudWxsLCAiZXJyYmFja3MiOiBudWxsLCAidGltZWxpbWl0IjogW251bGwsIG51bGxdLCAidGFza3NldCI6IG51bGwsICJjaG9yZCI6IG51bGx9", "content-encoding": "utf-8", "content-type": "application/json", "headers": {}, "properties": {"delivery_info": {"exchange": "", "routing_key": "etaq"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "f522469d"}}"#;
    const V1_NOW: &str = r#"{"body": "eyJ0YXNrIjogImFwcC53b3JrZXIudGFza3MudXJnZW50LnBhZ2Vfb25jYWxsIiwgImlkIjogIjExYWI4Y2M4LTRlMzQtNGFmYS04MTliLTM1NWNhZjhmOTU0MyIsICJhcmdzIjogWzJdLCAia3dhcmdzIjoge30sICJncm91cCI6IG51bGwsICJncm91cF9pbmRleCI6IG51bGwsICJyZXRyaWVzIjogMCwgImV0YSI6IG51bGwsICJleHBpcmVzIjogbnVsbCwgInV0YyI6IHRydWUsICJjYWxsYmFja3MiOiBudWxsLCAiZXJyYmFja3MiOiBudWxsLCAidGltZWxpbWl0IjogW251bGwsIG51bGxdLCAidGFza3NldCI6IG51bGwsICJjaG9yZCI6IG51bGx9", "content-type": "application/json", "headers": {}, "properties": {"body_encoding": "base64"}}"#;

    fn entry(message: &str) -> Vec<u8> {
        format!(r#"[{message}, "", "etaq"]"#).into_bytes()
    }

    fn ms(text: &str) -> i64 {
        text.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn etas_of_both_celery_protocols_are_read() {
        assert_eq!(eta_millis(&entry(V2_ETA)), Some(ms("2026-12-01T18:03:50.162Z")));
        assert_eq!(eta_millis(&entry(V1_ETA)), Some(ms("2026-12-01T18:03:50.346Z")));
        assert_eq!(eta_millis(&entry(V2_NOW)), None, "protocol 2, no ETA");
        assert_eq!(eta_millis(&entry(V1_NOW)), None, "protocol 1, no ETA");
        assert_eq!(routing_key(&entry(V2_ETA)).as_deref(), Some("etaq"));
    }

    #[test]
    fn other_messages_have_no_eta() {
        let cases = [
            r#"{"body": "x", "content-type": "application/x-python-serialize", "headers": {}, "properties": {"body_encoding": "base64"}}"#,
            r#"{"body": "not base64!", "content-type": "application/json", "headers": {}, "properties": {"body_encoding": "base64"}}"#,
            r#"{"body": "{\"eta\": \"2026-12-01T18:00:00Z\"}", "content-type": "application/json"}"#,
            r#"{"headers": {"task": "t", "eta": "tomorrow"}}"#,
            r#"{"headers": {"task": "t", "eta": 17}}"#,
            r#"{"headers": "weird"}"#,
            r#""a string""#,
        ];
        for message in cases {
            assert_eq!(eta_millis(&entry(message)), None, "{message}");
        }
        assert_eq!(eta_millis(b"not json"), None);
    }

    #[test]
    fn an_eta_without_offset_is_utc_and_an_unencoded_v1_body_is_read() {
        let naive = r#"{"headers": {"task": "t", "eta": "2026-12-01T18:00:00.5"}}"#;
        assert_eq!(eta_millis(&entry(naive)), Some(ms("2026-12-01T18:00:00.5Z")));
        let plain = r#"{"body": "{\"task\": \"t\", \"eta\": \"2026-12-01T19:00:00+01:00\"}", "content-type": "application/json"}"#;
        assert_eq!(eta_millis(&entry(plain)), Some(ms("2026-12-01T18:00:00Z")));
    }
}
