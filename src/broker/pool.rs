//! One reusable connection per broker endpoint.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::Mutex;

use super::reader::ReadError;
use super::url::BrokerEndpoint;

/// Connections are created on first use and kept; the manager reconnects by itself.
#[derive(Default)]
pub struct BrokerPool {
    conns: Mutex<HashMap<BrokerEndpoint, ConnectionManager>>,
    pub timeout: Option<Duration>,
}

impl BrokerPool {
    pub fn new(timeout: Duration) -> Self {
        Self { conns: Mutex::default(), timeout: Some(timeout) }
    }

    pub async fn connection(&self, endpoint: &BrokerEndpoint) -> Result<ConnectionManager, ReadError> {
        if let Some(c) = self.conns.lock().await.get(endpoint) {
            return Ok(c.clone());
        }
        let shown = endpoint.to_string();
        let timeout = self.timeout.unwrap_or(Duration::from_secs(5));
        let client = open_client(endpoint, timeout).await?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| with_tls_hint(endpoint, ReadError::from_redis(&shown, &e)))?;
        self.conns.lock().await.insert(endpoint.clone(), conn.clone());
        Ok(conn)
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

/// Certificate failures say which setting decides the trusted CAs.
fn with_tls_hint(endpoint: &BrokerEndpoint, err: ReadError) -> ReadError {
    let hint = match &endpoint.ca_pem {
        Some(_) => "the server's certificate is not signed by the CA bundle in spec.broker.caSecretRef",
        None => "if the broker's certificate comes from a private CA, put the CA in a Secret and set spec.broker.caSecretRef",
    };
    match err {
        ReadError::Unreachable { endpoint: shown, cause } if endpoint.tls && cause.contains("certificate") => {
            ReadError::Unreachable { endpoint: shown, cause: format!("{cause}; {hint}") }
        }
        other => other,
    }
}

/// A client for the endpoint's (current) Redis server. Shared by the depth reads and the
/// heartbeat subscription so both reach the same server the same way. For the Sentinel form this
/// asks the sentinels for the master's address, so calling it again after a failover finds the
/// new master.
pub async fn open_client(endpoint: &BrokerEndpoint, timeout: Duration) -> Result<redis::Client, ReadError> {
    let shown = endpoint.to_string();
    let info = match &endpoint.master_name {
        Some(master) if endpoint.is_sentinel() => {
            let (host, port) = master_addr(endpoint, master, timeout).await?;
            endpoint.connection_info_at(&host, port)
        }
        _ => endpoint.connection_info(),
    };
    let Some(pem) = &endpoint.ca_pem else {
        return redis::Client::open(info).map_err(|e| ReadError::from_redis(&shown, &e));
    };
    let bad_ca = |cause: String| ReadError::Other {
        endpoint: shown.clone(),
        cause: format!(
            "the CA bundle from spec.broker.caSecretRef is not usable ({cause}); put the PEM-encoded CA \
             certificate(s) that signed the broker's certificate in that Secret key"
        ),
    };
    // rustls silently skips non-PEM text, which would leave an empty trust store and a vague
    // "unknown issuer" on every connect.
    if !pem.windows(CERT_MARKER.len()).any(|w| w == CERT_MARKER) {
        return Err(bad_ca("no -----BEGIN CERTIFICATE----- block".into()));
    }
    let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) };
    redis::Client::build_with_tls(info, certs).map_err(|e| bad_ca(e.to_string()))
}

const CERT_MARKER: &[u8] = b"-----BEGIN CERTIFICATE-----";

/// `SENTINEL get-master-addr-by-name`, asking each sentinel in URL order until one knows the
/// master. Sentinels are dialled without credentials: kombu hands the URL's password to the
/// master only.
async fn master_addr(endpoint: &BrokerEndpoint, master: &str, timeout: Duration) -> Result<(String, u16), ReadError> {
    let config =
        redis::AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(timeout));
    let mut failures = Vec::new();
    // Some sentinel replied (unknown master / an error reply) as opposed to none being reachable.
    let (mut unknown, mut refused) = (false, false);
    for (host, port) in &endpoint.sentinels {
        let at = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let ask = async {
            let client = redis::Client::open(redis::ConnectionAddr::Tcp(host.clone(), *port))?;
            let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
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
                    failures.push(format!("{at}: odd master port {p:?}"));
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
                failures.push(format!("{at}: {e}"));
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
