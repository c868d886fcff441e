//! One reusable connection per broker endpoint, dialled by the operator so that every reply is
//! bounded (see `dial` and `resp`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;

use super::dial::{self, RejectSlot};
use super::reader::ReadError;
use super::resp::{Limits, Rejected};
use super::url::BrokerEndpoint;

struct Conn {
    conn: MultiplexedConnection,
    rejected: RejectSlot,
    /// The server it reached (for the Sentinel form, the master a sentinel named).
    addr: (String, u16),
    /// Its socket address, names resolved.
    peer: Option<SocketAddr>,
}

/// Connections are created on first use and kept until a read on them fails.
#[derive(Default)]
pub struct BrokerPool {
    conns: Mutex<HashMap<BrokerEndpoint, Conn>>,
    pub timeout: Option<Duration>,
    pub limits: Limits,
    /// Bytes received from every broker so far (for metrics and benchmarks).
    pub read_bytes: Counter,
}

impl BrokerPool {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout: Some(timeout), ..Self::default() }
    }

    /// Bytes received are added to `read_bytes` (the operator's metric).
    pub fn with_limits(timeout: Duration, limits: Limits, read_bytes: Counter) -> Self {
        Self { timeout: Some(timeout), limits, read_bytes, ..Self::default() }
    }

    fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(Duration::from_secs(5))
    }

    pub async fn connection(&self, endpoint: &BrokerEndpoint) -> Result<MultiplexedConnection, ReadError> {
        Ok(self.connection_at(endpoint).await?.0)
    }

    /// The connection and the address of the server it reached.
    pub async fn connection_at(
        &self,
        endpoint: &BrokerEndpoint,
    ) -> Result<(MultiplexedConnection, (String, u16)), ReadError> {
        if let Some(c) = self.conns.lock().await.get(endpoint) {
            return Ok((c.conn.clone(), c.addr.clone()));
        }
        let timeout = self.timeout();
        let addr = address(endpoint, timeout, self.limits).await?;
        let (conn, rejected, peer) =
            dial::connect(endpoint, (&addr.0, addr.1), timeout, self.limits, self.read_bytes.clone()).await?;
        let c = Conn { conn: conn.clone(), rejected, addr: addr.clone(), peer };
        self.conns.lock().await.insert(endpoint.clone(), c);
        Ok((conn, addr))
    }

    /// The socket address of the server the endpoint's open connection reached (None: no
    /// connection, or it is unknown).
    pub async fn peer(&self, endpoint: &BrokerEndpoint) -> Option<SocketAddr> {
        self.conns.lock().await.get(endpoint).and_then(|c| c.peer)
    }

    /// What closed the endpoint's connection, when the broker sent a reply over the bounds.
    pub async fn rejected(&self, endpoint: &BrokerEndpoint) -> Option<Rejected> {
        self.conns.lock().await.get(endpoint).and_then(|c| c.rejected.lock().expect("lock").clone())
    }

    /// The error of a failed read on the endpoint's connection: what the broker sent when a
    /// reply over the bounds closed it (redis-rs only sees the connection break), else `err`.
    pub async fn explain(&self, endpoint: &BrokerEndpoint, err: ReadError) -> ReadError {
        match self.rejected(endpoint).await {
            Some(r) => ReadError::rejected(&endpoint.to_string(), &r),
            None => err,
        }
    }

    /// Open connections.
    pub async fn len(&self) -> usize {
        self.conns.lock().await.len()
    }

    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }

    /// Drop a connection after a failure so the next tick dials afresh (e.g. new password).
    pub async fn forget(&self, endpoint: &BrokerEndpoint) {
        self.conns.lock().await.remove(endpoint);
    }
}

/// The address of the endpoint's (current) Redis server. For the Sentinel form this asks the
/// sentinels for the master's, so asking again after a failover finds the new master.
pub async fn address(endpoint: &BrokerEndpoint, timeout: Duration, limits: Limits) -> Result<(String, u16), ReadError> {
    match &endpoint.master_name {
        Some(master) if endpoint.is_sentinel() => master_addr(endpoint, master, timeout, limits).await,
        _ => Ok((endpoint.host.clone(), endpoint.port)),
    }
}

/// A redis-rs client for the endpoint's current server (tests and tools; the operator's own
/// connections come from [`BrokerPool`] and `heartbeat`, bounded).
pub async fn open_client(endpoint: &BrokerEndpoint, timeout: Duration) -> Result<redis::Client, ReadError> {
    let shown = endpoint.to_string();
    let (host, port) = address(endpoint, timeout, Limits::default()).await?;
    let info = endpoint.connection_info_at(&host, port);
    let Some(pem) = &endpoint.ca_pem else {
        return redis::Client::open(info).map_err(|e| ReadError::from_redis(&shown, &e));
    };
    let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) };
    redis::Client::build_with_tls(info, certs).map_err(|e| ReadError::from_redis(&shown, &e))
}

/// `SENTINEL get-master-addr-by-name`, asking each sentinel in URL order until one knows the
/// master. Sentinels are dialled without credentials: kombu hands the URL's password to the
/// master only.
async fn master_addr(
    endpoint: &BrokerEndpoint,
    master: &str,
    timeout: Duration,
    limits: Limits,
) -> Result<(String, u16), ReadError> {
    // Sentinels are plain TCP and have no database or credentials of the broker's.
    let sentinel = BrokerEndpoint { tls: false, username: None, password: None, db: 0, ..endpoint.clone() };
    let mut failures = Vec::new();
    // Some sentinel replied (unknown master / an error reply) as opposed to none being reachable.
    let (mut unknown, mut refused) = (false, false);
    for (host, port) in &endpoint.sentinels {
        let at = format!("{}:{port}", super::url::bracketed(host));
        let ask = async {
            let (mut conn, _, _) =
                dial::connect(&sentinel, (host, *port), timeout, limits, Counter::default())
                    .await
                    .map_err(|e| redis::RedisError::from((redis::ErrorKind::Io, "dial", e.to_string())))?;
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(master)
                .query_async::<Option<(String, String)>>(&mut conn)
                .await
        };
        // Belt and braces: DNS lookups are not covered by the connection timeout.
        match tokio::time::timeout(timeout * 2, ask).await {
            Ok(Ok(Some((h, p)))) => match p.parse() {
                Ok(p) => return Ok((h, p)),
                Err(_) => {
                    refused = true;
                    failures.push(format!("{at}: a master port that is not a number"));
                }
            },
            Ok(Ok(None)) => {
                unknown = true;
                failures.push(format!("{at}: unknown master"));
            }
            Ok(Err(e)) => {
                refused |= matches!(
                    e.kind(),
                    redis::ErrorKind::Server(_) | redis::ErrorKind::Extension | redis::ErrorKind::UnexpectedReturnType
                );
                failures.push(format!("{at}: {}", super::reader::peer_safe_cause(&e)));
            }
            Err(_) => failures.push(format!("{at}: no reply within {:?}", timeout * 2)),
        }
    }
    let endpoint = endpoint.to_string();
    let cause = failures.join("; ");
    if unknown {
        Err(ReadError::Other {
            endpoint,
            cause: format!(
                "no sentinel knows a master named {master:?} ({cause}); set spec.broker.transportOptions.masterName \
                 to the name in the sentinels' `sentinel monitor` line (the app's master_name)"
            ),
        })
    } else if refused {
        Err(ReadError::Other {
            endpoint,
            cause: format!(
                "no sentinel gave the master's address ({cause}); check that the sentinel:// URLs name Redis \
                 Sentinels that accept clients without a password (kombu's sentinel_kwargs are not supported)"
            ),
        })
    } else {
        Err(ReadError::Unreachable { endpoint, cause: format!("no sentinel answered ({cause})") })
    }
}
