//! Dialling a broker: TCP or TLS, then every byte it sends passes a [`Framer`] before redis-rs
//! parses it (see `resp`). redis-rs has no bound on a reply's size and dials its own sockets, so
//! the operator dials them and hands redis-rs the bounded stream
//! (`MultiplexedConnection::new_with_config`, `PubSub::new`), which keeps its command
//! encoding, reply parsing and `ConnectionLike` for everything else.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::reader::ReadError;
use super::resp::{Framer, Limits, Rejected};
use super::url::BrokerEndpoint;

/// A plain or TLS connection to a broker.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The refusal that closed a bounded connection, if one did: redis-rs reports only that the
/// connection failed, so the reader asks here what the broker sent.
pub type RejectSlot = Arc<Mutex<Option<Rejected>>>;

/// A stream whose incoming bytes are framed and bounded (see `resp`), and counted.
pub struct Bounded<S> {
    inner: S,
    framer: Framer,
    rejected: RejectSlot,
    read: Counter,
}

impl<S> Bounded<S> {
    pub fn new(inner: S, limits: Limits, rejected: RejectSlot, read: Counter) -> Self {
        Self { inner, framer: Framer::new(limits), rejected, read }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Bounded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let new = &buf.filled()[before..];
        this.read.inc_by(new.len() as u64);
        if let Err(rejected) = this.framer.feed(new) {
            // Nothing of the refused reply reaches redis-rs.
            buf.set_filled(before);
            *this.rejected.lock().expect("lock") = Some(rejected.clone());
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, rejected)));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Bounded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connect to `host:port` (TLS when the endpoint says so), within `timeout`.
pub async fn dial(endpoint: &BrokerEndpoint, host: &str, port: u16, timeout: Duration) -> Result<Stream, ReadError> {
    let shown = endpoint.to_string();
    let unreachable = |cause: String| ReadError::Unreachable { endpoint: shown.clone(), cause };
    let connect = async {
        let tcp = TcpStream::connect((host, port)).await.map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        if !endpoint.tls {
            return Ok(Stream::Tcp(tcp));
        }
        let config = tls_config(endpoint)?;
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| unreachable(format!("{host:?} is not a TLS server name: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| unreachable(tls_hint(endpoint, e.to_string())))?;
        Ok(Stream::Tls(Box::new(tls)))
    };
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| unreachable(format!("no connection within {timeout:?}")))?
}

/// Certificate failures say which setting decides the trusted CAs.
fn tls_hint(endpoint: &BrokerEndpoint, cause: String) -> String {
    if !cause.contains("certificate") && !cause.contains("Certificate") {
        return cause;
    }
    let hint = match &endpoint.ca_pem {
        Some(_) => "the server's certificate is not signed by the CA bundle in spec.broker.caSecretRef",
        None => "if the broker's certificate comes from a private CA, put the CA in a Secret and set spec.broker.caSecretRef",
    };
    format!("{cause}; {hint}")
}

const CERT_MARKER: &[u8] = b"-----BEGIN CERTIFICATE-----";

/// Trust the CA bundle from `spec.broker.caSecretRef`, else the public web roots; verify
/// nothing only where the URL says `ssl_cert_reqs=CERT_NONE`.
fn tls_config(endpoint: &BrokerEndpoint) -> Result<rustls::ClientConfig, ReadError> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let bad = |cause: String| ReadError::Other { endpoint: endpoint.to_string(), cause };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?;
    if endpoint.insecure {
        let verifier = Arc::new(AnyCertificate(provider));
        return Ok(builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    match &endpoint.ca_pem {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(pem) => {
            let bad_ca = |cause: String| {
                bad(format!(
                    "the CA bundle from spec.broker.caSecretRef is not usable ({cause}); put the PEM-encoded CA \
                     certificate(s) that signed the broker's certificate in that Secret key"
                ))
            };
            // rustls skips text that is not PEM: an empty trust store would fail every connect
            // with a vague "unknown issuer".
            if !pem.windows(CERT_MARKER.len()).any(|w| w == CERT_MARKER) {
                return Err(bad_ca("no -----BEGIN CERTIFICATE----- block".into()));
            }
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| bad_ca(e.to_string()))?;
                roots.add(cert).map_err(|e| bad_ca(e.to_string()))?;
            }
        }
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// `ssl_cert_reqs=CERT_NONE`: the URL asked for TLS without verification (Celery's spelling).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A bounded connection to the server at `host:port` (the endpoint's own address, or the
/// master a sentinel named): authenticated and on the endpoint's database.
pub struct Dialled {
    pub stream: Bounded<Stream>,
    /// The socket address reached (names resolved): one Redis server behind two URLs.
    pub peer: Option<std::net::SocketAddr>,
    pub rejected: RejectSlot,
    pub info: redis::RedisConnectionInfo,
}

pub async fn dial_bounded(
    endpoint: &BrokerEndpoint,
    (host, port): (&str, u16),
    timeout: Duration,
    limits: Limits,
    read: Counter,
) -> Result<Dialled, ReadError> {
    let stream = dial(endpoint, host, port, timeout).await?;
    let peer = match &stream {
        Stream::Tcp(s) => s.peer_addr().ok(),
        Stream::Tls(s) => s.get_ref().0.peer_addr().ok(),
    };
    let rejected = RejectSlot::default();
    let info = endpoint.connection_info_at(host, port).redis_settings().clone();
    Ok(Dialled { stream: Bounded::new(stream, limits, rejected.clone(), read), peer, rejected, info })
}

/// A multiplexed redis-rs connection over a bounded stream (its driver runs until the
/// connection is dropped or fails), where refusals are noted, and the socket address reached.
pub async fn connect(
    endpoint: &BrokerEndpoint,
    addr: (&str, u16),
    timeout: Duration,
    limits: Limits,
    read: Counter,
) -> Result<(redis::aio::MultiplexedConnection, RejectSlot, Option<std::net::SocketAddr>), ReadError> {
    let shown = endpoint.to_string();
    let d = dial_bounded(endpoint, addr, timeout, limits, read).await?;
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(timeout));
    let setup = redis::aio::MultiplexedConnection::new_with_config(&d.info, d.stream, config);
    let (conn, driver) = tokio::time::timeout(timeout, setup)
        .await
        .map_err(|_| ReadError::Unreachable { endpoint: shown.clone(), cause: format!("no reply within {timeout:?}") })?
        .map_err(|e| rejected_or(&d.rejected, &shown, &e))?;
    tokio::spawn(driver);
    Ok((conn, d.rejected, d.peer))
}

/// The error of a failed command: the refusal that closed the connection, if there was one.
pub fn rejected_or(slot: &RejectSlot, endpoint: &str, e: &redis::RedisError) -> ReadError {
    match slot.lock().expect("lock").clone() {
        Some(rejected) => ReadError::rejected(endpoint, &rejected),
        None => ReadError::from_redis(endpoint, e),
    }
}
