//! kombu's message envelope, as it sits in the `unacked` hash: `[message, exchange,
//! routing_key]`, `message` = `{"body", "content-encoding", "content-type", "headers",
//! "properties"}`. What the operator reads of it: the exchange, the routing key and the ETA,
//! from a whole value or from the ends of a big one (see `unacked`).

use std::borrow::Cow;

use base64::Engine;

/// What the operator keeps of one unacked message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub exchange: String,
    pub routing_key: String,
    /// Milliseconds since the epoch.
    pub eta: Option<i64>,
}

impl Held {
    /// From a whole `[message, exchange, routing_key]` value; None for anything else.
    pub fn from_value(value: &[u8]) -> Option<Held> {
        let (_, exchange, routing_key): (serde::de::IgnoredAny, String, String) = serde_json::from_slice(value).ok()?;
        Some(Held { exchange, routing_key, eta: eta_millis(value) })
    }

    /// From the first and last bytes of a value of `total` bytes (see the module docs).
    pub fn from_windows(head: &[u8], tail: &[u8], total: u64) -> Option<Held> {
        if head.len() as u64 == total {
            return Held::from_value(head);
        }
        let (exchange, routing_key) = last_two_strings(tail)?;
        let eta = headers_eta(tail).unwrap_or_else(|| protocol_1_eta(head, tail, total));
        Some(Held { exchange, routing_key, eta })
    }
}

/// The exchange and routing key at the end of `[message, "exchange", "routing_key"]`.
fn last_two_strings(tail: &[u8]) -> Option<(String, String)> {
    let end = trim_end(tail);
    let end = end.strip_suffix(b"]")?;
    let (rest, routing_key) = string_before(trim_end(end))?;
    let rest = trim_end(rest).strip_suffix(b",")?;
    let (_, exchange) = string_before(trim_end(rest))?;
    Some((exchange, routing_key))
}

fn trim_end(b: &[u8]) -> &[u8] {
    let n = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(0, |i| i + 1);
    &b[..n]
}

/// The JSON string that ends `b` (which ends with its closing quote), decoded, and what is
/// before it.
fn string_before(b: &[u8]) -> Option<(&[u8], String)> {
    let body = b.strip_suffix(b"\"")?;
    // The opening quote is the last one not escaped by an odd run of backslashes.
    let mut i = body.len();
    while let Some(q) = body[..i].iter().rposition(|&c| c == b'"') {
        let slashes = body[..q].iter().rev().take_while(|&&c| c == b'\\').count();
        if slashes % 2 == 0 {
            let text: String = serde_json::from_slice(&b[q..]).ok()?;
            return Some((&b[..q], text));
        }
        i = q;
    }
    None
}

/// Protocol 2: `headers.eta` of the message whose headers are in `tail`. Some(None): headers
/// that name a task and carry no ETA; None: no protocol 2 headers found.
fn headers_eta(tail: &[u8]) -> Option<Option<i64>> {
    const KEY: &[u8] = b"\"headers\"";
    let at = tail.windows(KEY.len()).rposition(|w| w == KEY)?;
    let rest = &tail[at + KEY.len()..];
    let colon = rest.iter().position(|c| !c.is_ascii_whitespace())?;
    if rest[colon] != b':' {
        return None;
    }
    let mut objects = serde_json::Deserializer::from_slice(&rest[colon + 1..]).into_iter::<Headers<'_>>();
    let headers = objects.next()?.ok()?;
    headers.task.as_ref()?;
    Some(headers.eta.and_then(|e| parse_eta(&e)))
}

/// Protocol 1: the ETA near the end of the base64 body (`{"task", "id", "args", "kwargs", ...,
/// "eta", "expires", "utc", ...}`), decoded from the body's last bytes in `tail`.
fn protocol_1_eta(head: &[u8], tail: &[u8], total: u64) -> Option<i64> {
    const BODY: &[u8] = b"\"body\"";
    // Where the body string starts, in the value.
    let key = head.windows(BODY.len()).position(|w| w == BODY)?;
    let open = key + BODY.len() + head[key + BODY.len()..].iter().position(|&c| c == b'"')? + 1;
    // Where it ends: base64 holds no quote, so the first quote of the tail (when the tail starts
    // inside the body).
    let tail_at = total.checked_sub(tail.len() as u64)?;
    let close = tail.iter().position(|&c| c == b'"')?;
    // Decode from a 4-aligned offset of the body inside the tail.
    let first = tail_at.max(open as u64);
    let aligned = first + (4 - (first - open as u64) % 4) % 4;
    let from = usize::try_from(aligned - tail_at).ok()?;
    let json = base64::engine::general_purpose::STANDARD.decode(tail.get(from..close)?).ok()?;
    const ETA: &[u8] = b"\"eta\"";
    let at = json.windows(ETA.len()).rposition(|w| w == ETA)?;
    let rest = &json[at + ETA.len()..];
    let colon = rest.iter().position(|c| !c.is_ascii_whitespace())?;
    let mut values = serde_json::Deserializer::from_slice(rest.get(colon + 1..)?).into_iter::<Option<String>>();
    values.next()?.ok()?.and_then(|e| parse_eta(&e))
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
