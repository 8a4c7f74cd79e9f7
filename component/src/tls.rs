//! TLS from PEM files, for the HTTPS endpoints Kubernetes calls (admission
//! webhooks): a server config loaded from a certificate chain and a key, kept
//! up to date when the files change (cert-manager and Kubernetes secrets
//! rotate them in place), and an axum listener that terminates TLS.

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

use crate::watch::Changes;

/// Loads a server config from a PEM certificate chain and a PEM key.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "{}: no certificate in it",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("{}: not a PEM private key: {e}", key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: certificate and key do not go together: {e}",
                    cert.display()
                )
            })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TCP listener that completes a TLS handshake before handing a
/// connection to axum, with the certificate reloaded whenever its files
/// change.
pub struct TlsListener {
    tcp: TcpListener,
    config: watch::Receiver<Arc<ServerConfig>>,
}

impl TlsListener {
    /// Listens on `tcp` with the certificate and key at these paths, and
    /// reloads them on change until `shutdown`. A reload that fails keeps
    /// the last good certificate.
    pub fn new(
        tcp: TcpListener,
        cert: PathBuf,
        key: PathBuf,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let (tx, config) = watch::channel(server_config(&cert, &key)?);
        let mut changes = Changes::files(&[cert.as_path(), key.as_path()])?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = changes.next() => if changed.is_none() { return },
                    _ = shutdown.cancelled() => return,
                }
                match server_config(&cert, &key) {
                    Ok(new) => {
                        tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                        tx.send_replace(new);
                    }
                    Err(e) => tracing::error!(
                        "TLS certificate not reloaded, the last good one stays: {e:#}"
                    ),
                }
            }
        });
        Ok(Self { tcp, config })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, peer) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, then retry.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = TlsAcceptor::from(self.config.borrow().clone());
            match acceptor.accept(stream).await {
                Ok(tls) => return (tls, peer),
                Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            }
        }
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
        // The listener completes only successful handshakes; the client
        // reports either outcome.
        tokio::pin!(client);
        tokio::select! {
            result = &mut client => result,
            _ = listener.accept() => client.await,
        }
    }

    #[tokio::test]
    async fn serves_the_certificate_and_reloads_it_when_the_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_certificate(dir.path(), "first");
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shutdown = CancellationToken::new();
        let mut listener = TlsListener::new(
            tcp,
            dir.path().join("cert.pem"),
            dir.path().join("key.pem"),
            shutdown.clone(),
        )
        .unwrap();
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

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), "not pem").unwrap();
        std::fs::write(dir.path().join("key.pem"), "not pem").unwrap();
        let e = server_config(&dir.path().join("cert.pem"), &dir.path().join("key.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cert.pem"), "{e}");
    }
}
