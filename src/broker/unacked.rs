//! kombu's in-flight messages, read once each.
//!
//! A worker that takes a message writes it into two keys in one transaction (reference §2.1):
//! `ZADD unacked_index <time> <tag>` and `HSET unacked <tag> [message, exchange, routing_key]`,
//! and removes both at the ack. A message under a tag never changes while it is there, so each
//! read lists the tags only (a page of `ZRANGE unacked_index`, about 43 bytes per tag) and reads
//! the value of a tag it has not seen before, once. Of a value it keeps only what it needs
//! (exchange, routing key, ETA): a value up to [`WHOLE`] bytes is parsed whole; of a bigger one
//! (a task carrying a file as an argument) only its first [`WHOLE`] and last [`WINDOW`] bytes are held
//! while the rest streams past, because kombu's envelope ends with the headers (protocol 2's ETA),
//! the properties, the exchange and the routing key, and protocol 1's ETA sits at the end of
//! its body.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::dial;
use super::message::Held;
use super::reader::ReadError;
use super::url::BrokerEndpoint;

/// Tags read per tick and prefix: pages of `ZRANGE unacked_index`, each within the reply bound.
pub const TAG_PAGE: usize = 10_000;
pub const TAG_PAGES: usize = 10;

/// A value up to this size is read and parsed whole; of a bigger one, this much of its start is
/// kept (where protocol 1's body starts).
pub const WHOLE: usize = 64 << 10;
/// Of a value bigger than [`WHOLE`], this much of its end is kept.
pub const WINDOW: usize = 64 << 10;

/// A tag's value as read: gone (acked between the tag list and the read), not a kombu message
/// (never counted), or held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetched {
    Gone,
    Foreign,
    Held(Held),
}

/// A held message as counted: the queues kombu would restore it to, and its ETA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub queues: Vec<String>,
    pub eta: Option<i64>,
    /// When this operator first read it: kombu's delivery time or later (see `workers`).
    pub seen: Instant,
}

/// The unacked messages seen so far, per key prefix and tag (None: not a kombu message).
#[derive(Debug, Default)]
pub struct Tags {
    by_prefix: HashMap<String, HashMap<Vec<u8>, Option<Entry>>>,
    /// Per prefix, tags beyond the pages a poll reads: held messages counted nowhere.
    unlisted: HashMap<String, i64>,
}

impl Tags {
    /// Keep the tags of `prefix` that are still listed; return the listed ones not known yet.
    pub fn update(&mut self, prefix: &str, listed: &HashSet<Vec<u8>>) -> Vec<Vec<u8>> {
        let known = self.by_prefix.entry(prefix.to_string()).or_default();
        known.retain(|tag, _| listed.contains(tag));
        listed.iter().filter(|t| !known.contains_key(*t)).cloned().collect()
    }

    pub fn insert(&mut self, prefix: &str, tag: Vec<u8>, entry: Option<Entry>) {
        self.by_prefix.entry(prefix.to_string()).or_default().insert(tag, entry);
    }

    /// Forget the prefixes not in `prefixes`.
    pub fn retain_prefixes(&mut self, prefixes: &[String]) {
        self.by_prefix.retain(|p, _| prefixes.contains(p));
        self.unlisted.retain(|p, _| prefixes.contains(p));
    }

    /// The held messages of `prefix`.
    pub fn held(&self, prefix: &str) -> impl Iterator<Item = &Entry> {
        self.by_prefix.get(prefix).into_iter().flat_map(|m| m.values().flatten())
    }

    /// Tags known, all prefixes.
    pub fn len(&self) -> usize {
        self.by_prefix.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Note how many of `prefix`'s tags the last poll could not list; the previous figure.
    pub fn set_unlisted(&mut self, prefix: &str, n: i64) -> i64 {
        self.unlisted.insert(prefix.to_string(), n).unwrap_or(0)
    }

    /// Held messages of `prefix` not listed by the last poll.
    pub fn unlisted_of(&self, prefix: &str) -> i64 {
        self.unlisted.get(prefix).copied().unwrap_or(0)
    }

    /// Held messages not listed by the last poll, all prefixes.
    pub fn unlisted(&self) -> i64 {
        self.unlisted.values().sum()
    }
}

/// One exchange's bindings as kombu keeps them: the members of `_kombu.binding.<exchange>`,
/// each `routing_key + sep + pattern + sep + queue` (reference §2.2). A topic exchange's
/// bindings carry the regex kombu compiled from the binding key; a direct exchange's have none.
#[derive(Debug, Default)]
pub struct Bindings(Vec<(String, Option<regex::Regex>, String)>);

/// kombu's queue for messages no binding takes (`Channel.deadletter_queue`).
pub const UNDELIVERABLE: &str = "ae.undeliver";

impl Bindings {
    pub fn parse(members: &[Vec<u8>], sep: &str) -> Self {
        let mut out = Vec::new();
        for m in members {
            let m = String::from_utf8_lossy(m);
            let parts: Vec<&str> = m.splitn(3, sep).collect();
            let [key, pattern, queue] = parts[..] else { continue };
            // kombu's patterns are small (`^feed\..*?$`); a bound keeps a hostile one cheap.
            let regex = (!pattern.is_empty()).then(|| regex::RegexBuilder::new(pattern).size_limit(1 << 16).build());
            match regex {
                Some(Err(_)) => continue,
                regex => out.push((key.to_string(), regex.and_then(Result::ok), queue.to_string())),
            }
        }
        Self(out)
    }

    /// The queues a message sent with `routing_key` went to, as kombu's `_lookup` finds them
    /// when it restores it: the direct bindings with an equal key, the topic bindings whose
    /// pattern matches (`re.match`); none: kombu's dead-letter queue.
    pub fn queues(&self, routing_key: &str) -> Vec<String> {
        let mut queues: Vec<String> = Vec::new();
        for (key, pattern, queue) in &self.0 {
            let hit = match pattern {
                Some(re) => re.find(routing_key).is_some_and(|m| m.start() == 0),
                None => key == routing_key,
            };
            if hit && !queues.contains(queue) {
                queues.push(queue.clone());
            }
        }
        if queues.is_empty() {
            queues.push(UNDELIVERABLE.to_string());
        }
        queues
    }
}

/// Where the values of new tags come from.
pub trait Bodies: Send {
    /// `HGET hash tag` for each tag, in order.
    fn fetch<'a>(&'a mut self, hash: &'a str, tags: &'a [Vec<u8>]) -> BoxFuture<'a, Result<Vec<Fetched>, ReadError>>;
}

/// Values streamed over a connection of their own, holding only the windows (the operator's
/// reads and `depth`).
pub struct Streamed {
    pub endpoint: BrokerEndpoint,
    pub addr: (String, u16),
    pub timeout: Duration,
    /// Bytes received are added here (the operator's `broker_received_bytes`).
    read: Counter,
    /// Kept between reads when the last fetch finished; a fetch cut short (its deadline, an
    /// error) drops it, since its replies may still be on the way.
    conn: Option<BufReader<dial::Stream>>,
}

/// Tags asked for in one pipeline.
const BATCH: usize = 256;

impl Streamed {
    pub fn new(endpoint: BrokerEndpoint, addr: (String, u16), timeout: Duration, read: Counter) -> Self {
        Self { endpoint, addr, timeout, read, conn: None }
    }

    /// A connection authenticated and on the endpoint's database.
    async fn open(&mut self) -> Result<BufReader<dial::Stream>, ReadError> {
        let shown = self.endpoint.to_string();
        let stream = dial::dial(&self.endpoint, &self.addr.0, self.addr.1, self.timeout).await?;
        let mut conn = BufReader::with_capacity(64 << 10, stream);
        let io = |e: std::io::Error| ReadError::Unreachable { endpoint: shown.clone(), cause: e.to_string() };
        let mut hello = Vec::new();
        if let Some(password) = &self.endpoint.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &self.endpoint.username {
                auth.arg(user);
            }
            hello.push(auth.arg(password).get_packed_command());
        }
        if self.endpoint.db != 0 {
            hello.push(redis::cmd("SELECT").arg(self.endpoint.db).get_packed_command());
        }
        write_all(conn.get_mut(), &hello.concat()).await.map_err(io)?;
        for _ in &hello {
            let line = read_line(&mut conn, &self.read).await.map_err(io)?;
            if line.first() == Some(&b'-') {
                return Err(error_reply(&shown, &line));
            }
        }
        Ok(conn)
    }
}

impl Bodies for Streamed {
    fn fetch<'a>(&'a mut self, hash: &'a str, tags: &'a [Vec<u8>]) -> BoxFuture<'a, Result<Vec<Fetched>, ReadError>> {
        Box::pin(async move {
            let shown = self.endpoint.to_string();
            let mut conn = match self.conn.take() {
                Some(c) => c,
                None => self.open().await?,
            };
            let io = |e: std::io::Error| ReadError::Unreachable { endpoint: shown.clone(), cause: e.to_string() };
            let mut out = Vec::with_capacity(tags.len());
            for batch in tags.chunks(BATCH) {
                let mut pipe = Vec::new();
                for tag in batch {
                    redis::cmd("HGET").arg(hash).arg(tag).write_packed_command(&mut pipe);
                }
                write_all(conn.get_mut(), &pipe).await.map_err(io)?;
                for _ in batch {
                    out.push(read_value(&mut conn, &self.read, &shown, hash).await?);
                }
            }
            self.conn = Some(conn);
            Ok(out)
        })
    }
}

async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// An error reply line (`-NOPERM ...`), classified as the replies redis-rs reads are.
fn error_reply(endpoint: &str, line: &[u8]) -> ReadError {
    let reply = [line, b"\r\n"].concat();
    match redis::parse_redis_value(&reply) {
        Ok(redis::Value::ServerError(e)) => ReadError::from_redis(endpoint, &e.into()),
        _ => ReadError::Other { endpoint: endpoint.to_string(), cause: "an error reply that does not parse".into() },
    }
}

/// One reply line (`+OK`, `-ERR ...`, `$12`), at most 4 KiB.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, read: &Counter) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let n = r.take(4096).read_until(b'\n', &mut line).await?;
    read.inc_by(n as u64);
    if !line.ends_with(b"\r\n") {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "a reply line without its end"));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

/// One `HGET` reply, streamed: only the windows are held.
async fn read_value<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    read: &Counter,
    endpoint: &str,
    hash: &str,
) -> Result<Fetched, ReadError> {
    let io = |e: std::io::Error| ReadError::Unreachable { endpoint: endpoint.to_string(), cause: e.to_string() };
    let line = read_line(r, read).await.map_err(io)?;
    let not_resp =
        || ReadError::rejected(endpoint, &super::resp::Rejected::NotResp { byte: line.first().copied().unwrap_or(0) });
    match line.first() {
        Some(b'$') if &line[..] == b"$-1" => return Ok(Fetched::Gone),
        Some(b'$') => {}
        Some(b'-') if line.starts_with(b"-WRONGTYPE") => {
            let cause = String::from_utf8_lossy(&line[1..]).into_owned();
            return Err(ReadError::WrongType { key: hash.to_string(), cause });
        }
        Some(b'-') => return Err(error_reply(endpoint, &line)),
        _ => return Err(not_resp()),
    }
    let total: u64 = std::str::from_utf8(&line[1..]).ok().and_then(|n| n.parse().ok()).ok_or_else(not_resp)?;
    // The first WHOLE bytes (all of a small value), and a tail of at most 2 * WINDOW bytes
    // trimmed to WINDOW at the end.
    let mut head = Vec::with_capacity(total.min(WHOLE as u64) as usize);
    let mut tail: Vec<u8> = Vec::new();
    let mut left = total;
    while left > 0 {
        let chunk = r.fill_buf().await.map_err(io)?;
        if chunk.is_empty() {
            return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let n = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let chunk = &chunk[..n];
        let to_head = (WHOLE - head.len()).min(n);
        head.extend_from_slice(&chunk[..to_head]);
        if total > WHOLE as u64 {
            tail.extend_from_slice(chunk);
            if tail.len() > 2 * WINDOW {
                tail.drain(..tail.len() - WINDOW);
            }
        }
        r.consume(n);
        read.inc_by(n as u64);
        left -= n as u64;
    }
    let mut crlf = [0u8; 2];
    r.read_exact(&mut crlf).await.map_err(io)?;
    read.inc_by(2);
    if tail.len() > WINDOW {
        tail.drain(..tail.len() - WINDOW);
    }
    Ok(match Held::from_windows(&head, &tail, total) {
        Some(h) => Fetched::Held(h),
        None => Fetched::Foreign,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn v2(body_len: usize, eta: Option<&str>, exchange: &str, rk: &str) -> Vec<u8> {
        let body = "QUJD".repeat(body_len / 4);
        let eta = eta.map_or("null".to_string(), |e| format!("\"{e}\""));
        format!(
            r#"[{{"body": "{body}", "content-encoding": "utf-8", "content-type": "application/json", "headers": {{"lang": "py", "task": "app.t", "id": "1", "eta": {eta}, "argsrepr": "(\"headers\": {{}})"}}, "properties": {{"delivery_info": {{"exchange": "{exchange}", "routing_key": "{rk}"}}, "body_encoding": "base64", "delivery_tag": "t1"}}}}, "{exchange}", "{rk}"]"#
        )
        .into_bytes()
    }

    fn v1(args_len: usize, eta: Option<&str>) -> Vec<u8> {
        let eta = eta.map_or("null".to_string(), |e| format!("\"{e}\""));
        let body = format!(
            r#"{{"task": "app.t", "id": "1", "args": ["{}"], "kwargs": {{}}, "retries": 0, "eta": {eta}, "expires": null, "utc": true}}"#,
            "x".repeat(args_len)
        );
        let body = base64::engine::general_purpose::STANDARD.encode(body);
        format!(
            r#"[{{"body": "{body}", "content-encoding": "utf-8", "content-type": "application/json", "headers": {{}}, "properties": {{"body_encoding": "base64"}}}}, "", "etaq"]"#
        )
        .into_bytes()
    }

    /// What a streamed read keeps of `value`.
    async fn streamed(value: &[u8]) -> Fetched {
        let mut reply = format!("${}\r\n", value.len()).into_bytes();
        reply.extend_from_slice(value);
        reply.extend_from_slice(b"\r\n");
        let mut r = BufReader::with_capacity(8 << 10, &reply[..]);
        let read = Counter::default();
        let got = read_value(&mut r, &read, "test", "unacked").await.unwrap();
        assert_eq!(read.get(), reply.len() as u64);
        got
    }

    fn held(exchange: &str, rk: &str, eta: Option<&str>) -> Fetched {
        let eta = eta.map(|e| e.parse::<jiff::Timestamp>().unwrap().as_millisecond());
        Fetched::Held(Held { exchange: exchange.into(), routing_key: rk.into(), eta })
    }

    #[tokio::test]
    async fn small_and_large_values_give_the_same_answer() {
        let eta = "2026-12-01T18:03:50.162849+00:00";
        for size in [10, WHOLE - 1000, WHOLE + 1, 3 * WINDOW + 7, 1 << 22] {
            assert_eq!(streamed(&v2(size, Some(eta), "", "etaq")).await, held("", "etaq", Some(eta)), "v2 {size}");
            assert_eq!(streamed(&v2(size, None, "feeds", "feed.import")).await, held("feeds", "feed.import", None));
            assert_eq!(streamed(&v1(size, Some(eta))).await, held("", "etaq", Some(eta)), "v1 {size}");
            assert_eq!(streamed(&v1(size, None)).await, held("", "etaq", None), "v1 {size}");
        }
    }

    #[tokio::test]
    async fn a_routing_key_with_quotes_and_an_unreadable_value() {
        let value = br#"[{"body": "", "headers": {"task": "t"}}, "ex\"", "rk \\\" \\"]"#;
        assert_eq!(Held::from_value(value).unwrap().routing_key, r#"rk \" \"#);
        let big = [&br#"[{"body": ""#[..], &vec![b'A'; WHOLE * 2], &br#""}, "ex\"", "rk \\\" \\"]"#[..]].concat();
        assert_eq!(streamed(&big).await, held("ex\"", r#"rk \" \"#, None));
        assert_eq!(streamed(b"not json").await, Fetched::Foreign);
        assert_eq!(streamed(&vec![b'x'; WHOLE * 3]).await, Fetched::Foreign);
    }

    #[test]
    fn bindings_route_as_kombu_restores() {
        let sep = "\x06\x16";
        let member = |key: &str, pattern: &str, queue: &str| format!("{key}{sep}{pattern}{sep}{queue}").into_bytes();
        // What kombu 5.7 writes for Queue('feeds', Exchange('feeds', type='topic'), routing_key='feed.#'),
        // Queue('one', ..., routing_key='feed.*.x') and a direct binding.
        let topic = Bindings::parse(
            &[member("feed.#", r"^feed\..*?$", "feeds"), member("feed.*.x", r"^feed\.[^\.]+\.x$", "one")],
            sep,
        );
        assert_eq!(topic.queues("feed.import"), ["feeds"]);
        assert_eq!(topic.queues("feed.a.x"), ["feeds", "one"]);
        assert_eq!(topic.queues("feed.a.b.x"), ["feeds"], "* is one word");
        assert_eq!(topic.queues("other"), [UNDELIVERABLE]);
        let direct = Bindings::parse(&[member("rk", "", "q1"), member("rk", "", "q2"), member("x", "", "q3")], sep);
        assert_eq!(direct.queues("rk"), ["q1", "q2"]);
        let broken = Bindings::parse(&[member("k", "(", "q"), b"no separators".to_vec()], sep);
        assert_eq!(broken.queues("k"), [UNDELIVERABLE], "an unusable member routes nothing");
    }

    #[test]
    fn tags_keep_what_is_listed_and_name_what_is_new() {
        let mut tags = Tags::default();
        let set = |t: &[&str]| t.iter().map(|s| s.as_bytes().to_vec()).collect::<HashSet<_>>();
        let mut new = tags.update("", &set(&["a", "b"]));
        new.sort();
        assert_eq!(new, vec![b"a".to_vec(), b"b".to_vec()]);
        tags.insert("", b"a".to_vec(), None);
        tags.insert("", b"b".to_vec(), None);
        assert_eq!(tags.update("", &set(&["b", "c"])), vec![b"c".to_vec()]);
        assert_eq!(tags.len(), 1, "a is gone");
    }
}
