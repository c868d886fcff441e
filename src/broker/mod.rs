//! Reading Celery's Redis broker: URL parsing, kombu's key layout, one pipelined read per broker.
//! The operator only ever reads from the broker.

pub mod allow;
pub mod dial;
pub mod heartbeat;
pub mod keys;
pub mod message;
pub mod pool;
pub mod reader;
pub mod resp;
pub mod unacked;
pub mod url;
pub mod workers;

pub use self::url::{BrokerEndpoint, UrlError};
pub use keys::DepthQuery;
pub use pool::BrokerPool;
pub use reader::{QueueDepth, ReadError};
