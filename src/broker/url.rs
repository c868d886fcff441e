//! Celery broker URLs: `redis://[user:pass@]host[:port][/db]` and `rediss://...` (TLS).
//!
//! The password is kept out of `Debug`/`Display` so it never reaches logs, status or events.

use std::fmt;

use percent_encoding::percent_decode_str;

/// Where and how to connect; equal endpoints share one connection.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BrokerEndpoint {
    pub tls: bool,
    /// TLS without certificate verification; only when the URL asks for it
    /// (`ssl_cert_reqs=CERT_NONE`, Celery's spelling).
    pub insecure: bool,
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("broker URL is empty; put the Celery broker URL (redis://host:6379/0) in the Secret")]
    Empty,
    #[error("broker URL is not a URL ({0}); expected redis://[user:password@]host[:port][/db]")]
    Malformed(String),
    #[error("broker URL scheme {0:?} is not supported; use redis:// or rediss:// (Celery's Redis transport)")]
    Scheme(String),
    #[error("broker URL has no host; expected redis://host[:port][/db]")]
    NoHost,
    #[error("broker URL database {0:?} is not a number; use e.g. redis://host:6379/0")]
    Db(String),
    #[error("broker URL parameter ssl_cert_reqs={0:?} is not one of CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE")]
    CertReqs(String),
}

impl BrokerEndpoint {
    pub fn parse(raw: &str) -> Result<Self, UrlError> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(UrlError::Empty);
        }
        // Never echo the URL itself in errors: it may carry the password.
        let url = url::Url::parse(raw).map_err(|e| UrlError::Malformed(e.to_string()))?;
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            other => return Err(UrlError::Scheme(other.to_string())),
        };
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
        Ok(Self { tls, insecure, host, port: url.port().unwrap_or(6379), db, username, password })
    }

    pub fn connection_info(&self) -> redis::ConnectionInfo {
        use redis::IntoConnectionInfo;
        let addr = if self.tls {
            redis::ConnectionAddr::TcpTls {
                host: self.host.clone(),
                port: self.port,
                insecure: self.insecure,
                tls_params: None,
            }
        } else {
            redis::ConnectionAddr::Tcp(self.host.clone(), self.port)
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

impl fmt::Display for BrokerEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let user = self.username.as_deref().unwrap_or("");
        let auth = match (&self.username, &self.password) {
            (_, Some(_)) => format!("{user}:***@"),
            (Some(_), None) => format!("{user}@"),
            (None, None) => String::new(),
        };
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        write!(f, "{scheme}://{auth}{host}:{}/{}", self.port, self.db)
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
            ("sentinel://s1:26379", UrlError::Scheme("sentinel".into())),
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
}
