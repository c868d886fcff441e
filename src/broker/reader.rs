//! One pipelined round trip: LLEN of every priority list of every queried queue, plus the
//! delivery tags in kombu's `unacked_index` per key prefix (in-flight messages). Only tags not
//! seen before cost more: their values are read once (see `unacked`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use tracing::warn;

use super::keys::DepthQuery;
use super::message::Held;
pub use super::message::{eta_millis, routing_key};
use super::unacked::{Bindings, Bodies, Entry, Fetched, Tags, TAG_PAGE, TAG_PAGES};

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
    /// Entries for this queue that no live worker can be holding (see `workers`): not counted
    /// in `in_flight`; kombu restores them after the transport's `visibility_timeout`.
    pub orphaned: i64,
    /// Held messages under this queue's key prefix beyond the tags a poll lists (counted nowhere,
    /// see `unacked::TAG_PAGES`).
    pub unlisted: i64,
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
        "the broker user of {endpoint} may not run a command the operator needs ({cause}); give it the read-only \
         ACL in the README (+llen +zcard +zrange +hget +smembers +select +subscribe)"
    )]
    NoPermission { endpoint: String, cause: String },
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
            ReadError::NoPermission { .. } => "BrokerPermissionDenied",
        }
    }

    /// The broker sent a reply over the bounds (see `resp`).
    pub fn rejected(endpoint: &str, rejected: &super::resp::Rejected) -> Self {
        ReadError::Rejected { endpoint: endpoint.to_string(), cause: rejected.to_string() }
    }

    pub fn from_redis(endpoint: &str, e: &redis::RedisError) -> Self {
        let code = e.code().unwrap_or("");
        let cause = peer_safe_cause(e);
        let endpoint = endpoint.to_string();
        if code == "NOPERM" {
            ReadError::NoPermission { endpoint, cause }
        } else if matches!(code, "NOAUTH" | "WRONGPASS") || e.kind() == redis::ErrorKind::AuthenticationFailed {
            ReadError::Auth { endpoint, cause }
        } else if e.is_connection_refusal() || e.is_timeout() || e.is_io_error() || e.is_connection_dropped() {
            ReadError::Unreachable { endpoint, cause }
        } else {
            ReadError::Other { endpoint, cause }
        }
    }
}

/// Redis's error codes, the only words of an error reply a message repeats.
const REDIS_CODES: &[&str] = &[
    "ERR",
    "NOPERM",
    "NOAUTH",
    "WRONGPASS",
    "WRONGTYPE",
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "BUSY",
    "NOSCRIPT",
    "CLUSTERDOWN",
    "MOVED",
    "ASK",
    "TRYAGAIN",
    "CROSSSLOT",
    "EXECABORT",
    "NOPROTO",
    "NOREPLICAS",
    "OOM",
    "MISCONF",
];

/// What went wrong, in the operator's own words: never bytes the peer sent (an error reply's
/// text, a reply of the wrong type, bytes that do not parse), only their kind, and for an error
/// reply its code if it is one of Redis's. A TaskQueue's broker URL may name any address the
/// operator reaches; its conditions must not show the tenant what answers there.
pub fn peer_safe_cause(e: &redis::RedisError) -> String {
    if let Some(code) = e.code() {
        let code = if REDIS_CODES.contains(&code) { code } else { "not a Redis error code" };
        return format!("the server answered with an error ({code})");
    }
    let cause = if e.is_connection_refusal() {
        "connection refused"
    } else if e.is_timeout() {
        "no reply in time"
    } else if e.is_connection_dropped() {
        "the connection was closed"
    } else if e.kind() == redis::ErrorKind::AuthenticationFailed {
        "authentication failed"
    } else if e.is_io_error() {
        // This process's own I/O and TLS errors (the peer's bytes never get into them).
        return e.to_string();
    } else {
        "a reply that is not what a Redis server sends there"
    };
    cause.to_string()
}

/// Read all `queries` in one pipeline (see [`ReadPlan`]), the values of unacked messages over
/// the same connection (tests; the operator streams them, see `unacked::Streamed`).
pub async fn read_depths<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    endpoint: &str,
    queries: &[DepthQuery],
) -> Result<Vec<Result<QueueDepth, ReadError>>, ReadError> {
    let mut tags = Tags::default();
    let in_flight = InFlight { tags: &mut tags, bodies: None, budget: Duration::from_secs(3600), holders: None };
    ReadPlan::new(queries.to_vec()).read(conn, endpoint, in_flight).await
}

/// What a read knows and uses about in-flight messages: the tags seen so far, where new values
/// come from (None: the read's own connection), and how long reading them may take. Past the
/// budget the lists are still published; the values not read yet are read next time.
pub struct InFlight<'a> {
    pub tags: &'a mut Tags,
    pub bodies: Option<&'a mut dyn Bodies>,
    pub budget: Duration,
    /// Who may be holding an entry (None: every entry is held, as without heartbeats).
    pub holders: Option<&'a dyn Holders>,
}

/// Whether an entry of `queue` under `prefix`, first seen at `seen`, may still be held by a live
/// worker; false makes it an orphan.
pub trait Holders: Sync {
    fn may_hold(&self, prefix: &str, queue: &str, seen: Instant) -> bool;
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
    /// The queries this plan reads.
    pub fn queries(&self) -> &[DepthQuery] {
        &self.queries
    }

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
                            cause: peer_safe_cause(&e),
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
        let InFlight { tags, mut bodies, budget, holders } = in_flight;
        let deadline = tokio::time::Instant::now() + budget;
        tags.retain_prefixes(prefixes);
        for prefix in prefixes {
            let index = format!("{prefix}unacked_index");
            let listed = read_tags(&mut next, &index).map_err(|e| match e {
                TagsError::Redis(e) => redis_err(e),
                TagsError::WrongType(cause) => ReadError::WrongType { key: index.clone(), cause },
            })?;
            // Said once when it starts; the figure is in taskqueue_broker_unacked_unlisted.
            let unlisted = (listed.total - listed.tags.len() as i64).max(0);
            if tags.set_unlisted(prefix, unlisted) == 0 && unlisted > 0 {
                warn!(
                    broker = endpoint,
                    "{index} holds {} tags; a poll reads {}: {unlisted} held messages are not counted",
                    listed.total,
                    listed.tags.len()
                );
            }
            let new = tags.update(prefix, &listed.tags);
            if !new.is_empty() {
                let sep = queries.iter().find(|q| &q.prefix == prefix).map_or("", |q| q.sep.as_str());
                learn(conn, endpoint, (prefix, sep), new, tags, bodies.as_deref_mut(), (deadline, budget)).await?;
            }
        }
        count_in_flight(queries, &mut out, tags, holders);
        Ok(out)
    }
}

/// Read the values of `prefix`'s new tags (from `bodies`, else over `conn`) and note where each
/// message belongs. Past `deadline` or on a failure of the read the tags stay new, to be read
/// next time (a warning says so); a broker user that may not read them fails the read.
async fn learn<'b, C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    endpoint: &str,
    (prefix, sep): (&str, &str),
    new: Vec<Vec<u8>>,
    tags: &mut Tags,
    bodies: Option<&mut (dyn Bodies + 'b)>,
    (deadline, budget): (tokio::time::Instant, Duration),
) -> Result<(), ReadError> {
    let hash = format!("{prefix}unacked");
    let fetch = async {
        match bodies {
            Some(b) => b.fetch(&hash, &new).await,
            None => hget_each(conn, endpoint, &hash, &new).await,
        }
    };
    let values = match tokio::time::timeout_at(deadline, fetch).await {
        Ok(Ok(values)) => values,
        // The user may not read them: say so in the TaskQueues' condition.
        Ok(Err(e @ (ReadError::NoPermission { .. } | ReadError::Auth { .. }))) => return Err(e),
        Ok(Err(e)) => {
            warn!(broker = endpoint, error = %e, "{} new unacked messages not read yet", new.len());
            return Ok(());
        }
        Err(_) => {
            warn!(broker = endpoint, "{} new unacked messages not read within {budget:?}", new.len());
            return Ok(());
        }
    };
    let bindings = bindings_of(conn, prefix, sep, &values).await.map_err(|e| ReadError::from_redis(endpoint, &e))?;
    let seen = Instant::now();
    for (tag, value) in new.into_iter().zip(values) {
        match value {
            Fetched::Gone => {}
            Fetched::Foreign => tags.insert(prefix, tag, None),
            Fetched::Held(h) => {
                let queues = match bindings.get(&h.exchange) {
                    Some(b) => b.queues(&h.routing_key),
                    None => vec![h.routing_key],
                };
                tags.insert(prefix, tag, Some(Entry { queues, eta: h.eta, seen }));
            }
        }
    }
    Ok(())
}

/// The bindings of every named exchange among `values` (Celery's default publishing uses the
/// unnamed one: routing key = queue, no lookup).
async fn bindings_of<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    prefix: &str,
    sep: &str,
    values: &[Fetched],
) -> redis::RedisResult<HashMap<String, Bindings>> {
    let exchanges: BTreeSet<&str> = values
        .iter()
        .filter_map(|v| match v {
            Fetched::Held(h) if !h.exchange.is_empty() => Some(h.exchange.as_str()),
            _ => None,
        })
        .collect();
    if exchanges.is_empty() {
        return Ok(HashMap::new());
    }
    let mut pipe = redis::pipe();
    for e in &exchanges {
        pipe.cmd("SMEMBERS").arg(format!("{prefix}_kombu.binding.{e}"));
    }
    let members: Vec<Vec<Vec<u8>>> = pipe.query_async(conn).await?;
    Ok(exchanges.into_iter().zip(members).map(|(e, m)| (e.to_string(), Bindings::parse(&m, sep))).collect())
}

/// Count each queue's held messages and collect their ETAs. A message belongs to the queues
/// kombu would restore it to (see `unacked::Bindings`).
fn count_in_flight(
    queries: &[DepthQuery],
    out: &mut [Result<QueueDepth, ReadError>],
    tags: &Tags,
    holders: Option<&dyn Holders>,
) {
    #[derive(Default)]
    struct Count {
        held: i64,
        etas: Vec<i64>,
        orphaned: i64,
    }
    let mut by_queue: HashMap<(&str, &str), Count> = HashMap::new();
    for prefix in queries.iter().map(|q| q.prefix.as_str()).collect::<BTreeSet<_>>() {
        for held in tags.held(prefix) {
            for queue in &held.queues {
                let count = by_queue.entry((prefix, queue.as_str())).or_default();
                if holders.is_none_or(|h| h.may_hold(prefix, queue, held.seen)) {
                    count.held += 1;
                    count.etas.extend(held.eta);
                } else {
                    count.orphaned += 1;
                }
            }
        }
    }
    for (q, d) in queries.iter().zip(out.iter_mut()) {
        let Ok(d) = d else { continue };
        d.unlisted = tags.unlisted_of(&q.prefix);
        if let Some(count) = by_queue.get(&(q.prefix.as_str(), q.queue.as_str())) {
            d.in_flight = count.held;
            d.orphaned = count.orphaned;
            d.etas.clone_from(&count.etas);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// kombu's keys as a model: lists, `unacked_index` and `unacked`, answering the commands a
    /// read sends. A tag in `racing` is acked by a worker between the tag list and its HGET.
    #[derive(Default)]
    struct Model {
        lists: HashMap<Vec<u8>, i64>,
        index: Vec<Vec<u8>>,
        hash: HashMap<Vec<u8>, Vec<u8>>,
        racing: HashSet<Vec<u8>>,
        hgets: HashMap<Vec<u8>, usize>,
    }

    impl Model {
        fn answer(&mut self, cmd: &redis::Cmd) -> redis::Value {
            use redis::Value::{Array, BulkString, Int, Nil};
            let args: Vec<Vec<u8>> = cmd
                .args_iter()
                .map(|a| match a {
                    redis::Arg::Simple(b) => b.to_vec(),
                    _ => b"0".to_vec(),
                })
                .collect();
            let num = |i: usize| String::from_utf8_lossy(&args[i]).parse::<usize>().unwrap();
            match &args[0][..] {
                b"LLEN" => Int(self.lists.get(&args[1]).copied().unwrap_or(0)),
                b"ZCARD" => Int(self.index.len() as i64),
                b"ZRANGE" => {
                    let (from, to) = (num(2), num(3));
                    Array(self.index.iter().skip(from).take(to + 1 - from).cloned().map(BulkString).collect())
                }
                b"HGET" => {
                    let tag = &args[2];
                    *self.hgets.entry(tag.clone()).or_default() += 1;
                    if self.racing.remove(tag) {
                        self.ack(tag);
                    }
                    self.hash.get(tag).cloned().map_or(Nil, BulkString)
                }
                b"SMEMBERS" => Array(Vec::new()),
                other => panic!("the model does not know {}", String::from_utf8_lossy(other)),
            }
        }

        fn ack(&mut self, tag: &[u8]) {
            self.index.retain(|t| t != tag);
            self.hash.remove(tag);
        }

        /// What Redis holds for `queue`, counted by hand.
        fn held(&self, queue: &str) -> i64 {
            self.hash.values().filter(|v| Held::from_value(v).is_some_and(|h| h.routing_key == queue)).count() as i64
        }
    }

    impl redis::aio::ConnectionLike for Model {
        fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
            let v = self.answer(cmd);
            Box::pin(async move { Ok(v) })
        }
        fn req_packed_commands<'a>(
            &'a mut self,
            pipeline: &'a redis::Pipeline,
            offset: usize,
            count: usize,
        ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
            let v: Vec<redis::Value> = pipeline.cmd_iter().map(|c| self.answer(c)).skip(offset).take(count).collect();
            Box::pin(async move { Ok(v) })
        }
        fn get_db(&self) -> i64 {
            0
        }
    }

    #[tokio::test]
    async fn held_messages_beyond_the_pages_read_are_counted_as_unlisted() {
        let plan = ReadPlan::new(vec![DepthQuery::new("alpha", &crate::crd::TransportOptions::default())]);
        let (mut model, mut tags) = (Model::default(), Tags::default());
        let (pages, extra) = (TAG_PAGE * TAG_PAGES, 5);
        for i in 0..pages + extra {
            let tag = format!("t{i}").into_bytes();
            model.index.push(tag.clone());
            model.hash.insert(tag, br#"[{}, "", "alpha"]"#.to_vec());
        }
        let in_flight = InFlight { tags: &mut tags, bodies: None, budget: Duration::from_secs(60), holders: None };
        let got = plan.read(&mut model, "model", in_flight).await.unwrap();
        assert_eq!(got[0].as_ref().unwrap().in_flight, pages as i64, "what the pages list is counted");
        assert_eq!(tags.unlisted(), extra as i64, "the rest is said, not counted");
        assert_eq!(got[0].as_ref().unwrap().unlisted, extra as i64, "and reaches the queue's reading");
    }

    /// Tags added and acked between reads, some acked between a read's tag list and its HGET:
    /// every read counts exactly what the hash holds, and reads each value once.
    #[tokio::test]
    async fn counts_follow_a_changing_unacked_hash_and_each_value_is_read_once() {
        let mut rand = crate::xorshift(0xacced);
        let queues = ["alpha", "beta", "gamma"];
        let opts = crate::crd::TransportOptions::default();
        let plan = ReadPlan::new(queues.iter().map(|q| DepthQuery::new(q, &opts)).collect());
        let (mut model, mut tags) = (Model::default(), Tags::default());
        let mut next_tag = 0;
        for round in 0..300 {
            for _ in 0..rand(8) {
                let tag = format!("tag-{next_tag}").into_bytes();
                next_tag += 1;
                let queue = queues[rand(3) as usize];
                let value = if rand(10) == 0 {
                    b"not a kombu message".to_vec()
                } else {
                    serde_json::json!([{"body": "", "headers": {"task": "t"}}, "", queue]).to_string().into_bytes()
                };
                model.index.push(tag.clone());
                model.hash.insert(tag.clone(), value);
                if rand(6) == 0 {
                    model.racing.insert(tag);
                }
            }
            for _ in 0..rand(6) {
                if !model.index.is_empty() {
                    let tag = model.index[rand(model.index.len() as u64) as usize].clone();
                    model.ack(&tag);
                }
            }
            let in_flight = InFlight { tags: &mut tags, bodies: None, budget: Duration::from_secs(1), holders: None };
            let got = plan.read(&mut model, "model", in_flight).await.unwrap();
            for (q, d) in queues.iter().zip(got) {
                assert_eq!(d.unwrap().in_flight, model.held(q), "round {round}, queue {q}");
            }
            assert!(model.hgets.values().all(|&n| n == 1), "round {round}: a value was read twice");
        }
        assert!(next_tag > 500, "the rounds made {next_tag} messages");
    }
}
