//! TLS from PEM files, for the HTTPS endpoints Kubernetes calls (admission
//! webhooks) and the mTLS gRPC ports of the control plane: a server config
//! loaded from a certificate chain, a key and optionally the root that
//! client certificates must chain to, kept up to date when the files change
//! (cert-manager, Kubernetes secrets and Citadel rotate them in place), and
//! a listener that terminates TLS, for axum or as a stream for tonic.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;

use futures::{StreamExt, future::BoxFuture, stream::FuturesUnordered};

use crate::{
    limits::{Limits, ServerLimits, Tracked, admitted},
    watch::Changes,
};

/// The files of a TLS server, and the protocols it offers.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate that chains to it.
    pub client_root: Option<PathBuf>,
    /// ALPN protocols, most preferred first.
    pub alpn: Vec<Vec<u8>>,
}

impl TlsFiles {
    /// An HTTP/1.1 server without client authentication.
    pub fn https(cert: PathBuf, key: PathBuf) -> Self {
        Self {
            cert,
            key,
            client_root: None,
            alpn: vec![b"http/1.1".to_vec()],
        }
    }

    /// A gRPC (HTTP/2) server that requires client certificates from `root`.
    pub fn mutual_grpc(cert: PathBuf, key: PathBuf, root: PathBuf) -> Self {
        Self {
            cert,
            key,
            client_root: Some(root),
            alpn: vec![b"h2".to_vec()],
        }
    }

    fn paths(&self) -> Vec<&Path> {
        let mut paths = vec![self.cert.as_path(), self.key.as_path()];
        paths.extend(self.client_root.as_deref());
        paths
    }
}

fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate chain: {e}", path.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "{}: no certificate in it",
        path.display()
    );
    Ok(chain)
}

/// Loads a server config from its files.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<ServerConfig>> {
    let (cert, key) = (files.cert.as_path(), files.key.as_path());
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("{}: not a PEM private key: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &files.client_root {
        None => builder.with_no_client_auth(),
        Some(root) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates(root)? {
                roots.add(c).map_err(|e| {
                    anyhow::anyhow!("{}: not a CA certificate: {e}", root.display())
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| anyhow::anyhow!("{}: {e}", root.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        anyhow::anyhow!(
            "{}: certificate and key do not go together: {e}",
            cert.display()
        )
    })?;
    config.alpn_protocols = files.alpn.clone();
    Ok(Arc::new(config))
}

/// A handshake under way: the connection, or `None` when it failed.
type Handshake = BoxFuture<'static, Option<(TlsStream<Tracked<TcpStream>>, SocketAddr)>>;

/// A TCP listener that completes a TLS handshake before handing a
/// connection to axum, with the certificate reloaded whenever its files
/// change. Handshakes run side by side, each bounded in time, so a client
/// that stalls in its handshake holds up no one else.
pub struct TlsListener {
    tcp: TcpListener,
    config: watch::Receiver<Arc<ServerConfig>>,
    limits: Option<Limits>,
    handshakes: FuturesUnordered<Handshake>,
}

impl TlsListener {
    /// Listens on `tcp` with `files`, and reloads them on change until
    /// `shutdown`. A reload that fails keeps the last good certificate.
    pub fn new(
        tcp: TcpListener,
        files: TlsFiles,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let (tx, config) = watch::channel(server_config(&files)?);
        let mut changes = Changes::files(&files.paths())?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = changes.next() => if changed.is_none() { return },
                    _ = shutdown.cancelled() => return,
                }
                match server_config(&files) {
                    Ok(new) => {
                        tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
                        tx.send_replace(new);
                    }
                    Err(e) => tracing::error!(
                        "TLS certificate not reloaded, the last good one stays: {e:#}"
                    ),
                }
            }
        });
        Ok(Self::from_configs(tcp, config))
    }

    /// Listens on `tcp` with whatever server config `config` holds at each
    /// handshake, for a server that makes its own (Citadel signs its own
    /// serving certificate).
    pub fn from_configs(tcp: TcpListener, config: watch::Receiver<Arc<ServerConfig>>) -> Self {
        Self {
            tcp,
            config,
            limits: None,
            handshakes: FuturesUnordered::new(),
        }
    }

    /// Admits connections against `limits`' peer limit.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }
}

impl TlsListener {
    /// The next connection whose handshake completes; failed handshakes
    /// are logged and skipped.
    async fn next_connection(&mut self) -> (TlsStream<Tracked<TcpStream>>, SocketAddr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, peer)) => self.handshake(stream, peer),
                    Err(e) => {
                        // Out of file descriptors and the like: wait, then retry.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                Some(done) = self.handshakes.next(), if !self.handshakes.is_empty() => {
                    if let Some(connection) = done {
                        return connection;
                    }
                }
            }
        }
    }

    /// Starts the handshake of a connection from `peer`, if the peer may
    /// open one more.
    fn handshake(&mut self, stream: TcpStream, peer: SocketAddr) {
        let Some(stream) = admitted(self.limits.as_ref(), stream, peer) else {
            return;
        };
        let acceptor = TlsAcceptor::from(self.config.borrow().clone());
        let limits = self.limits.clone();
        let timeout = limits.as_ref().map_or_else(
            || ServerLimits::default().handshake_timeout,
            Limits::handshake_timeout,
        );
        self.handshakes.push(Box::pin(async move {
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => Some((tls, peer)),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    if let Some(limits) = limits {
                        limits.handshake_timed_out();
                    }
                    None
                }
            }
        }));
    }

    /// The connections as a stream, for `tonic`'s `serve_with_incoming`.
    pub fn into_incoming(
        self,
    ) -> impl futures::Stream<Item = io::Result<TlsStream<Tracked<TcpStream>>>> {
        futures::stream::unfold(self, |mut listener| async move {
            let (tls, _) = listener.next_connection().await;
            Some((Ok(tls), listener))
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<Tracked<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.next_connection().await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::ServerName;
    use tokio_rustls::TlsConnector;

    use super::*;
    use axum::serve::Listener;

    fn write_certificate(dir: &Path, name: &str) -> rcgen::Certificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        // Replace, as secret mounts and cert-manager do.
        std::fs::write(dir.join("cert.tmp"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.tmp"), key.serialize_pem()).unwrap();
        std::fs::rename(dir.join("key.tmp"), dir.join("key.pem")).unwrap();
        std::fs::rename(dir.join("cert.tmp"), dir.join("cert.pem")).unwrap();
        cert
    }

    /// The certificate the listener presents to a client that trusts `trusted`.
    async fn handshake(
        listener: &mut TlsListener,
        trusted: &rcgen::Certificate,
    ) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trusted.der().clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let addr = listener.local_addr().unwrap();
        let client = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        // The listener completes only successful handshakes, and only
        // while it is accepting; the client reports either outcome.
        tokio::pin!(client);
        loop {
            tokio::select! {
                result = &mut client => return result,
                _ = listener.accept() => {}
            }
        }
    }

    #[tokio::test]
    async fn serves_the_certificate_and_reloads_it_when_the_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_certificate(dir.path(), "first");
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shutdown = CancellationToken::new();
        let files = TlsFiles::https(dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let mut listener = TlsListener::new(tcp, files, shutdown.clone()).unwrap();
        handshake(&mut listener, &first).await.unwrap();

        let second = write_certificate(dir.path(), "second");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while handshake(&mut listener, &second).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the new certificate was not loaded"
            );
            listener.config.changed().await.unwrap();
        }
        assert!(
            handshake(&mut listener, &first).await.is_err(),
            "the old certificate is gone"
        );
        shutdown.cancel();
    }

    /// A listener on 127.0.0.1 serving a certificate written to `dir`.
    async fn serving(dir: &Path) -> (TlsListener, rcgen::Certificate, CancellationToken) {
        let cert = write_certificate(dir, "only");
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shutdown = CancellationToken::new();
        let files = TlsFiles::https(dir.join("cert.pem"), dir.join("key.pem"));
        let listener = TlsListener::new(tcp, files, shutdown.clone()).unwrap();
        (listener, cert, shutdown)
    }

    #[tokio::test]
    async fn a_client_silent_in_its_handshake_holds_up_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let (mut listener, cert, shutdown) = serving(dir.path()).await;
        let addr = listener.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).await.unwrap();
        // Well within the handshake timeout that would free a listener
        // that took handshakes one at a time.
        let bound = ServerLimits::default().handshake_timeout / 2;
        tokio::time::timeout(bound, handshake(&mut listener, &cert))
            .await
            .expect("the second client waited on the first one's handshake")
            .unwrap();
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_peer_over_its_connection_limit_gets_no_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, cert, shutdown) = serving(dir.path()).await;
        let addr = listener.local_addr().unwrap();
        let limits = Limits::unregistered(&ServerLimits {
            max_connections_per_peer: 1,
            ..Default::default()
        });
        let mut listener = listener.with_limits(limits.clone());
        let _silent = TcpStream::connect(addr).await.unwrap();
        // The silent connection holds the peer's one place, so this
        // handshake is refused; the listener is accepting meanwhile.
        let refused = handshake(&mut listener, &cert).await;
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(limits.reached("connections_per_peer"), 1);
        shutdown.cancel();
    }

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), "not pem").unwrap();
        std::fs::write(dir.path().join("key.pem"), "not pem").unwrap();
        let files = TlsFiles::https(dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let e = server_config(&files).unwrap_err().to_string();
        assert!(e.contains("cert.pem"), "{e}");
        // A bad client root is named too.
        write_certificate(dir.path(), "good");
        std::fs::write(dir.path().join("root.pem"), "not pem").unwrap();
        let files = TlsFiles::mutual_grpc(
            dir.path().join("cert.pem"),
            dir.path().join("key.pem"),
            dir.path().join("root.pem"),
        );
        let e = server_config(&files).unwrap_err().to_string();
        assert!(e.contains("root.pem"), "{e}");
    }
}

/// Handshake signatures, checked by a crypto provider's algorithms: the
/// part of every certificate verifier that does not depend on whose
/// certificate it accepts. Verifiers delegate their signature methods here.
#[derive(Debug, Clone)]
pub struct HandshakeSignatures(Arc<rustls::crypto::CryptoProvider>);

impl HandshakeSignatures {
    pub fn new(provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        Self(provider)
    }

    pub fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    pub fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    pub fn schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The three handshake-signature methods of a rustls certificate verifier
/// (client or server), delegated to the verifier's `signatures:
/// HandshakeSignatures` field: written once for every verifier.
#[macro_export]
macro_rules! delegate_handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            self.signatures.tls12(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            self.signatures.tls13(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<::rustls::SignatureScheme> {
            self.signatures.schemes()
        }
    };
}
