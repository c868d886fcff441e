//! Celery broker URLs: `redis://[user:pass@]host[:port][/db]`, `rediss://...` (TLS) and kombu's
//! Sentinel form `sentinel://[user:pass@]h1:26379[/db];sentinel://h2:26379;...`.
//!
//! The password is kept out of `Debug`/`Display` so it never reaches logs, status or events.

use std::fmt;
use std::sync::Arc;

use percent_encoding::percent_decode_str;

/// kombu's default port for `sentinel://` URLs without one.
const SENTINEL_PORT: u16 = 26379;

/// Where and how to connect; equal endpoints share one connection.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BrokerEndpoint {
    pub tls: bool,
    /// TLS without certificate verification; only when the URL asks for it
    /// (`ssl_cert_reqs=CERT_NONE`, Celery's spelling).
    pub insecure: bool,
    /// The Redis server; for the Sentinel form, the first sentinel (the master is looked up).
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Sentinel form: every sentinel to ask, in URL order; empty for `redis://`/`rediss://`.
    pub sentinels: Vec<(String, u16)>,
    /// Sentinel form: the monitored master's name (kombu transport option `master_name`).
    pub master_name: Option<String>,
    /// PEM CA bundle (from `spec.broker.caSecretRef`) trusted instead of the system roots. Part
    /// of equality so a rotated CA gets a new connection.
    pub ca_pem: Option<Arc<[u8]>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("broker URL is empty; put the Celery broker URL (redis://host:6379/0) in the Secret")]
    Empty,
    #[error("broker URL is not a URL ({0}); expected redis://[user:password@]host[:port][/db]")]
    Malformed(String),
    #[error(
        "broker URL scheme {0:?} is not supported; use redis://, rediss:// or sentinel:// (Celery's Redis transport)"
    )]
    Scheme(String),
    #[error("broker URL has no host; expected redis://host[:port][/db]")]
    NoHost,
    #[error("broker URL database {0:?} is not a number; use e.g. redis://host:6379/0")]
    Db(String),
    #[error("broker URL parameter ssl_cert_reqs={0:?} is not one of CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE")]
    CertReqs(String),
    #[error("broker URL mixes sentinel:// with {0}://; list every sentinel as sentinel://host:port, separated by ';'")]
    MixedSentinel(String),
    #[error(
        "broker URL is sentinel:// but spec.broker.transportOptions.masterName is not set; set it to the \
         master_name of the app's broker_transport_options"
    )]
    NoMasterName,
    #[error(
        "spec.broker.caSecretRef is set but the broker URL is not rediss://; remove caSecretRef or use a rediss:// \
         URL (TLS to Sentinel-managed masters is not supported)"
    )]
    CaWithoutTls,
    #[error(
        "spec.broker.caSecretRef is set but the broker URL turns verification off (ssl_cert_reqs=CERT_NONE); \
         remove one of them"
    )]
    CaWithoutVerification,
}

/// The parts of one URL, before deciding which form it belongs to.
struct Parsed {
    scheme: String,
    insecure: bool,
    host: String,
    port: Option<u16>,
    db: i64,
    username: Option<String>,
    password: Option<String>,
}

fn parse_one(raw: &str) -> Result<Parsed, UrlError> {
    // Never echo the URL itself in errors: it may carry the password.
    let url = url::Url::parse(raw).map_err(|e| UrlError::Malformed(e.to_string()))?;
    let scheme = url.scheme().to_string();
    if !matches!(scheme.as_str(), "redis" | "rediss" | "sentinel") {
        return Err(UrlError::Scheme(scheme));
    }
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or(UrlError::NoHost)?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    let username = Some(decode(url.username())).filter(|u| !u.is_empty());
    let password = url.password().map(decode).filter(|p| !p.is_empty());
    let path = url.path().trim_start_matches('/');
    let mut db = if path.is_empty() { 0 } else { path.parse().map_err(|_| UrlError::Db(path.to_string()))? };
    let mut insecure = false;
    for (k, v) in url.query_pairs() {
        match k.as_ref() {
            "db" => db = v.parse().map_err(|_| UrlError::Db(v.to_string()))?,
            "ssl_cert_reqs" => {
                insecure = match v.to_ascii_uppercase().as_str() {
                    "CERT_NONE" | "NONE" => true,
                    "CERT_REQUIRED" | "REQUIRED" | "CERT_OPTIONAL" | "OPTIONAL" => false,
                    _ => return Err(UrlError::CertReqs(v.to_string())),
                }
            }
            _ => {}
        }
    }
    if db < 0 {
        return Err(UrlError::Db(db.to_string()));
    }
    Ok(Parsed { scheme, insecure, host, port: url.port(), db, username, password })
}

impl BrokerEndpoint {
    /// A `redis://` or `rediss://` URL; a `sentinel://` URL needs [`BrokerEndpoint::resolve`].
    pub fn parse(raw: &str) -> Result<Self, UrlError> {
        Self::resolve(raw, None, None)
    }

    /// The endpoint a TaskQueue describes: the broker URL from its Secret, the kombu
    /// `master_name` transport option (`sentinel://` only) and the PEM CA bundle from
    /// `spec.broker.caSecretRef` (`rediss://` only).
    pub fn resolve(raw_url: &str, master_name: Option<&str>, ca_pem: Option<Vec<u8>>) -> Result<Self, UrlError> {
        let raw = raw_url.trim();
        if raw.is_empty() {
            return Err(UrlError::Empty);
        }
        let master_name = master_name.map(str::trim).filter(|m| !m.is_empty());
        // kombu splits on ';' into one URL per sentinel. Plain URLs are parsed whole, as before
        // (a ';' in a password stays part of it).
        let sentinel = raw.get(..11).is_some_and(|s| s.eq_ignore_ascii_case("sentinel://"));
        let parts: Vec<&str> =
            if sentinel { raw.split(';').map(str::trim).filter(|p| !p.is_empty()).collect() } else { vec![raw] };
        let first = parse_one(parts.first().ok_or(UrlError::Empty)?)?;
        if first.scheme != "sentinel" {
            // master_name is ignored here, as kombu does: apps often share transport options
            // between a Sentinel and a plain deployment.
            let tls = first.scheme == "rediss";
            match (&ca_pem, tls, first.insecure) {
                (Some(_), false, _) => return Err(UrlError::CaWithoutTls),
                (Some(_), true, true) => return Err(UrlError::CaWithoutVerification),
                _ => {}
            }
            return Ok(Self {
                tls,
                insecure: first.insecure,
                port: first.port.unwrap_or(6379),
                host: first.host,
                db: first.db,
                username: first.username,
                password: first.password,
                sentinels: Vec::new(),
                master_name: None,
                ca_pem: ca_pem.map(Arc::from),
            });
        }
        if ca_pem.is_some() {
            return Err(UrlError::CaWithoutTls);
        }
        let mut sentinels = vec![(first.host.clone(), first.port.unwrap_or(SENTINEL_PORT))];
        for part in &parts[1..] {
            // Like kombu, only the first URL's credentials and database count; the others
            // contribute their address.
            let p = parse_one(part)?;
            if p.scheme != "sentinel" {
                return Err(UrlError::MixedSentinel(p.scheme));
            }
            sentinels.push((p.host, p.port.unwrap_or(SENTINEL_PORT)));
        }
        let master_name = master_name.ok_or(UrlError::NoMasterName)?;
        Ok(Self {
            tls: false,
            insecure: false,
            host: sentinels[0].0.clone(),
            port: sentinels[0].1,
            db: first.db,
            username: first.username,
            password: first.password,
            sentinels,
            master_name: Some(master_name.to_string()),
            ca_pem: None,
        })
    }

    pub fn is_sentinel(&self) -> bool {
        !self.sentinels.is_empty()
    }

    /// How to reach the server the URL names. For the Sentinel form that is the master once a
    /// sentinel has told its address: use `pool::open_client`, which asks them.
    pub fn connection_info(&self) -> redis::ConnectionInfo {
        self.connection_info_at(&self.host, self.port)
    }

    /// The endpoint's database, credentials and TLS settings for the server at `host:port`.
    pub fn connection_info_at(&self, host: &str, port: u16) -> redis::ConnectionInfo {
        use redis::IntoConnectionInfo;
        let addr = if self.tls {
            redis::ConnectionAddr::TcpTls { host: host.to_string(), port, insecure: self.insecure, tls_params: None }
        } else {
            redis::ConnectionAddr::Tcp(host.to_string(), port)
        };
        let mut settings = redis::RedisConnectionInfo::default().set_db(self.db);
        if let Some(u) = &self.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &self.password {
            settings = settings.set_password(p);
        }
        addr.into_connection_info().expect("a ConnectionAddr always converts").set_redis_settings(settings)
    }
}

/// `host`, in brackets when it is an IPv6 address (as it is written before `:port`).
pub(crate) fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

impl fmt::Display for BrokerEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match (self.is_sentinel(), self.tls) {
            (true, _) => "sentinel",
            (false, true) => "rediss",
            (false, false) => "redis",
        };
        let user = self.username.as_deref().unwrap_or("");
        let auth = match (&self.username, &self.password) {
            (_, Some(_)) => format!("{user}:***@"),
            (Some(_), None) => format!("{user}@"),
            (None, None) => String::new(),
        };
        if self.is_sentinel() {
            let hosts: Vec<String> = self.sentinels.iter().map(|(h, p)| format!("{}:{p}", bracketed(h))).collect();
            let master = self.master_name.as_deref().unwrap_or("");
            return write!(f, "{scheme}://{auth}{}/{} (master {master})", hosts.join(","), self.db);
        }
        write!(f, "{scheme}://{auth}{}:{}/{}", bracketed(&self.host), self.port, self.db)?;
        if self.ca_pem.is_some() {
            f.write_str(" (CA from caSecretRef)")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BrokerEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerEndpoint({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_celery_accepts() {
        let e = BrokerEndpoint::parse("redis://localhost").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port, e.db), (false, "localhost", 6379, 0));
        let e = BrokerEndpoint::parse("redis://:s3cr%40t@redis.default.svc:6380/2").unwrap();
        assert_eq!((e.port, e.db, e.username.as_deref(), e.password.as_deref()), (6380, 2, None, Some("s3cr@t")));
        let e = BrokerEndpoint::parse("redis://worker:pw@10.0.0.5/3").unwrap();
        assert_eq!((e.username.as_deref(), e.password.as_deref(), e.db), (Some("worker"), Some("pw"), 3));
        let e = BrokerEndpoint::parse("rediss://:pw@cache.example.com:6379/0").unwrap();
        assert!(e.tls && !e.insecure, "TLS verifies certificates unless told not to");
        let e = BrokerEndpoint::parse("rediss://cache:6379/0?ssl_cert_reqs=CERT_NONE").unwrap();
        assert!(e.insecure);
        let e = BrokerEndpoint::parse("redis://[::1]:7000/1").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.db), ("::1", 7000, 1));
        let e = BrokerEndpoint::parse("  redis://h/0?db=4\n").unwrap();
        assert_eq!(e.db, 4, "surrounding whitespace (common in Secrets) is ignored");
    }

    #[test]
    fn rejects_bad_urls_with_a_fix_and_without_the_password() {
        let cases: &[(&str, UrlError)] = &[
            ("", UrlError::Empty),
            ("amqp://guest:hunter2@rabbit//", UrlError::Scheme("amqp".into())),
            ("sentinel://:hunter2@s1:26379", UrlError::NoMasterName),
            ("sentinel://s1;redis://:hunter2@s2", UrlError::MixedSentinel("redis".into())),
            ("unix:///run/redis.sock", UrlError::Scheme("unix".into())),
            ("redis://:hunter2@host/zero", UrlError::Db("zero".into())),
            ("rediss://host/0?ssl_cert_reqs=maybe", UrlError::CertReqs("maybe".into())),
        ];
        for (raw, want) in cases {
            assert_eq!(&BrokerEndpoint::parse(raw).unwrap_err(), want, "{raw}");
        }
        let err = BrokerEndpoint::parse("redis//:hunter2@host").unwrap_err();
        assert!(matches!(err, UrlError::Malformed(_)));
        for (raw, _) in cases {
            if let Err(e) = BrokerEndpoint::parse(raw) {
                assert!(!e.to_string().contains("hunter2"), "{e}");
            }
        }
    }

    #[test]
    fn display_and_debug_redact_the_password() {
        let e = BrokerEndpoint::parse("redis://user:hunter2@host:1234/5").unwrap();
        assert_eq!(e.to_string(), "redis://user:***@host:1234/5");
        assert!(!format!("{e:?}").contains("hunter2"));
        let e = BrokerEndpoint::parse("redis://host").unwrap();
        assert_eq!(e.to_string(), "redis://host:6379/0");
    }

    #[test]
    fn sentinel_urls_as_kombu_reads_them() {
        let raw = "sentinel://:s3cr%40t@s1:26380/3;sentinel://s2;sentinel://[::1]:26381/9";
        let e = BrokerEndpoint::resolve(raw, Some("mymaster"), None).unwrap();
        assert_eq!(e.sentinels, [("s1".into(), 26380), ("s2".into(), 26379), ("::1".into(), 26381)]);
        assert_eq!((e.master_name.as_deref(), e.db, e.password.as_deref()), (Some("mymaster"), 3, Some("s3cr@t")));
        assert!(e.is_sentinel() && !e.tls);
        assert_eq!(e.to_string(), "sentinel://:***@s1:26380,s2:26379,[::1]:26381/3 (master mymaster)");
        assert!(!format!("{e:?}").contains("s3cr"));
        // kombu takes credentials and database from the first URL only.
        let e = BrokerEndpoint::resolve("sentinel://s1;sentinel://:pw@s2/5", Some("m"), None).unwrap();
        assert_eq!((e.db, e.password.as_deref()), (0, None));
        assert_eq!(e.to_string(), "sentinel://s1:26379,s2:26379/0 (master m)");
        // Same URL, other master: another endpoint.
        let other = BrokerEndpoint::resolve("sentinel://s1;sentinel://:pw@s2/5", Some("n"), None).unwrap();
        assert_ne!(e, other);
        let err = BrokerEndpoint::resolve("sentinel://s1", None, None).unwrap_err();
        assert!(err.to_string().contains("spec.broker.transportOptions.masterName"), "{err}");
        let e = BrokerEndpoint::resolve("redis://h/0", Some("m"), None).unwrap();
        assert_eq!(e, BrokerEndpoint::parse("redis://h/0").unwrap(), "kombu ignores master_name without Sentinel");
        assert_eq!(BrokerEndpoint::parse("redis://:pa;ss@h/0").unwrap().password.as_deref(), Some("pa;ss"));
    }

    #[test]
    fn a_ca_bundle_belongs_to_verified_tls_urls_only() {
        let pem = b"-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n".to_vec();
        let e = BrokerEndpoint::resolve("rediss://:hunter2@h:6380/1", None, Some(pem.clone())).unwrap();
        assert_eq!(e.ca_pem.as_deref(), Some(&pem[..]));
        assert_eq!(e.to_string(), "rediss://:***@h:6380/1 (CA from caSecretRef)");
        let other = BrokerEndpoint::resolve("rediss://:hunter2@h:6380/1", None, Some(b"other".to_vec())).unwrap();
        assert_ne!(e, other, "a rotated CA is a new connection");
        assert_ne!(e, BrokerEndpoint::parse("rediss://:hunter2@h:6380/1").unwrap());
        for (raw, want) in [
            ("redis://:hunter2@h/0", UrlError::CaWithoutTls),
            ("sentinel://:hunter2@s1", UrlError::CaWithoutTls),
            ("rediss://:hunter2@h/0?ssl_cert_reqs=CERT_NONE", UrlError::CaWithoutVerification),
        ] {
            let err =
                BrokerEndpoint::resolve(raw, Some("m").filter(|_| raw.starts_with("sentinel")), Some(pem.clone()))
                    .unwrap_err();
            assert_eq!(err, want, "{raw}");
            assert!(err.to_string().contains("spec.broker.caSecretRef") && !err.to_string().contains("hunter2"));
        }
    }
}
