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
        let client = redis::Client::open(endpoint.connection_info()).map_err(|e| ReadError::from_redis(&shown, &e))?;
        let timeout = self.timeout.unwrap_or(Duration::from_secs(5));
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn =
            ConnectionManager::new_with_config(client, config).await.map_err(|e| ReadError::from_redis(&shown, &e))?;
        self.conns.lock().await.insert(endpoint.clone(), conn.clone());
        Ok(conn)
    }

    /// Drop a connection after a failure so the next tick dials afresh (e.g. new password).
    pub async fn forget(&self, endpoint: &BrokerEndpoint) {
        self.conns.lock().await.remove(endpoint);
    }
}
