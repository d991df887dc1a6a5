//! TLS on the daemon's own listeners (the bridge, and the operator's
//! `/healthz`, `/readyz`, `/metrics`): a certificate chain and its key, read
//! from PEM files when the configuration is loaded, and a listener that does
//! its handshakes concurrently, each within [`HANDSHAKE_TIMEOUT`] and at most
//! [`MAX_HANDSHAKES`] at once, so that a slow or silent client never holds up
//! the next one.

use axum::serve::Listener;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

/// How long a client gets to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most handshakes in progress at once; past it, connections wait in the
/// kernel's accept queue.
pub const MAX_HANDSHAKES: usize = 256;

/// A certificate or key file that cannot be used: which key names it, and
/// why.
#[derive(Debug, thiserror::Error)]
#[error("{key} = {path}: {reason}")]
pub struct TlsFileError {
    /// The configuration key, e.g. `bridge.tls_cert_file`.
    pub key: String,
    pub path: PathBuf,
    pub reason: String,
}

/// The server side of TLS for one listener: reads the certificate chain and
/// its private key (`<table>.tls_cert_file`, `<table>.tls_key_file`) and
/// checks that they belong together.
pub fn server_config(
    table: &str,
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsFileError> {
    let error = |which: &str, path: &Path, reason: String| TlsFileError {
        key: format!("{table}.{which}"),
        path: path.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| error("tls_cert_file", cert_file, pem_reason(e)))?;
    if chain.is_empty() {
        return Err(error(
            "tls_cert_file",
            cert_file,
            "holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| error("tls_key_file", key_file, pem_reason(e)))?;
    // rustls picks its provider from crate features; make the choice
    // explicit for processes that never made one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            error(
                "tls_key_file",
                key_file,
                format!(
                    "does not fit the certificate in {}: {e}",
                    cert_file.display()
                ),
            )
        })?;
    Ok(Arc::new(config))
}

fn pem_reason(error: rustls::pki_types::pem::Error) -> String {
    match error {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => {
            "no PEM item of the expected kind in it".into()
        }
        other => format!("not a usable PEM file: {other:?}"),
    }
}

/// A bound listener, plain or TLS, for `axum::serve`.
pub struct ServeListener {
    /// How it accepts.
    inner: Inner,
    /// The address it is bound to.
    local: SocketAddr,
}

enum Inner {
    Plain(TcpListener),
    /// Handshakes are done by a task of their own; finished ones arrive
    /// here. The task stops when this end is dropped.
    Tls(mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>),
}

impl ServeListener {
    /// Serves `listener` as is, or over TLS with `tls`.
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let inner = match tls {
            None => Inner::Plain(listener),
            Some(config) => {
                let (handed, incoming) = mpsc::channel(MAX_HANDSHAKES);
                tokio::spawn(handshakes(listener, config.into(), handed));
                Inner::Tls(incoming)
            }
        };
        Ok(ServeListener { inner, local })
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.inner, Inner::Tls(_))
    }
}

/// Accepts connections and runs their handshakes, each in a task of its own,
/// until the listener's receiving end is dropped.
async fn handshakes(
    mut listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handed: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let in_progress = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            permit = in_progress.clone().acquire_owned() => {
                permit.expect("the semaphore is never closed")
            }
            () = handed.closed() => return,
        };
        let (tcp, peer) = tokio::select! {
            accepted = Listener::accept(&mut listener) => accepted,
            () = handed.closed() => return,
        };
        let acceptor = acceptor.clone();
        let handed = handed.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = handed.send((stream, peer)).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(
                    %peer,
                    timeout_s = HANDSHAKE_TIMEOUT.as_secs(),
                    "TLS handshake not completed in time; connection closed"
                ),
            }
        });
    }
}

impl Listener for ServeListener {
    type Io = Either<TcpStream, TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match &mut self.inner {
            Inner::Plain(listener) => {
                let (stream, peer) = Listener::accept(listener).await;
                (Either::Left(stream), peer)
            }
            Inner::Tls(incoming) => match incoming.recv().await {
                Some((stream, peer)) => (Either::Right(stream), peer),
                // The handshake task ended (it only does when this end is
                // dropped): nothing more will come.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
