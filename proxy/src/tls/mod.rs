//! TLS with `rustls`. Between proxies: the workload certificate the agent
//! holds, peers checked against the mesh root and by SPIFFE identity
//! rather than host name, and the ALPN `istio` that tells mesh TLS from an
//! application's own. With peers outside the mesh (a DestinationRule's
//! `SIMPLE` or `MUTUAL` TLS, a Gateway's certificates): files config names,
//! and peers checked as the web checks them ([`web_pki`]). Configs are
//! built from the latest certificate and cached until it changes, so a
//! renewal takes effect on the next handshake and open connections carry
//! on.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use component::{
    spiffe::{self, Identity, Usage},
    tls::HandshakeSignatures,
};
use rustls::{
    ClientConfig, DistinguishedName, ServerConfig,
    client::danger::{ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::{
    agent::{Credentials, CredentialsWatch},
    config::tls::{Source, Tls},
    secrets::Secrets,
};

mod web_pki;

use self::web_pki::WebPkiVerifier;

/// The ALPN a sidecar offers on mesh TLS.
pub const MESH_ALPN: &str = "istio";

/// Builds (and caches) TLS configs from the current credentials.
pub struct TlsContext {
    credentials: CredentialsWatch,
    /// Gateways' credentials, by name.
    secrets: Arc<Secrets>,
    provider: Arc<CryptoProvider>,
    servers: Mutex<Cache<ServerConfig>>,
    clients: Mutex<Cache<ClientConfig>>,
}

/// Configs by settings, for one version of the credentials and of the
/// files the settings name.
struct Cache<T> {
    /// The credentials the configs were built with, held: compared by
    /// address, and an address is not reused while it is held (a renewal's
    /// credentials in the address of a freed earlier one would otherwise
    /// pass for the credentials already built with, and the expired
    /// certificate would go on being presented).
    credentials: Option<Arc<Credentials>>,
    configs: HashMap<Tls, (Files, Arc<T>)>,
}

fn digest(what: &impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    what.hash(&mut h);
    h.finish()
}

/// A digest of each file (or credential) a setting names: a rotated certificate (a
/// Secret's mount swapped, a file rewritten) is read again on the next
/// handshake, while open connections carry on. Contents, not times, so
/// that a rewrite within a file system's timestamp granularity counts.
type Files = Vec<Option<u64>>;

fn files(tls: &Tls, secrets: &Secrets) -> Files {
    let (certificate, key) = match &tls.certificate {
        Some((c, k)) => (Some(c), Some(k)),
        None => (None, None),
    };
    [certificate, key, tls.roots.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|source| match source {
            Source::File(path) => Some(std::fs::read(path).ok().map(|b| digest(&b))),
            Source::Credential(name) => Some(secrets.get(name).map(|c| digest(&c))),
            Source::Mesh => None,
        })
        .collect()
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Self {
            credentials: None,
            configs: HashMap::new(),
        }
    }
}

impl<T> Cache<T> {
    fn get_or_build(
        &mut self,
        credentials: &Option<Arc<Credentials>>,
        tls: &Tls,
        files: Files,
        build: impl FnOnce() -> Result<T, String>,
    ) -> Result<Arc<T>, String> {
        let same = match (&self.credentials, credentials) {
            (Some(built), Some(current)) => Arc::ptr_eq(built, current),
            (None, None) => true,
            _ => false,
        };
        if !same {
            self.configs.clear();
            self.credentials = credentials.clone();
        }
        let cached = self.configs.get(tls);
        if let Some((read, c)) = cached
            && *read == files
        {
            return Ok(c.clone());
        }
        match build() {
            Ok(built) => {
                let built = Arc::new(built);
                self.configs.insert(tls.clone(), (files, built.clone()));
                Ok(built)
            }
            // Files caught mid-rotation (a new certificate beside the old
            // key): the last good config serves until they agree.
            Err(e) if let Some((_, c)) = cached => {
                tracing::warn!("TLS files changed but cannot be used yet: {e}");
                Ok(c.clone())
            }
            Err(e) => Err(e),
        }
    }
}

impl TlsContext {
    pub fn new(credentials: CredentialsWatch, secrets: Arc<Secrets>) -> Self {
        Self {
            credentials,
            secrets,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            servers: Mutex::default(),
            clients: Mutex::default(),
        }
    }

    /// The current credentials, or why there are none.
    fn mesh(&self, credentials: &Option<Arc<Credentials>>) -> Result<Arc<Credentials>, String> {
        credentials
            .clone()
            .ok_or_else(|| "no workload certificate from Citadel (yet)".to_string())
    }

    fn certificate(
        &self,
        credentials: &Option<Arc<Credentials>>,
        source: &(Source, Source),
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        match source {
            (Source::Mesh, _) => {
                let c = self.mesh(credentials)?;
                Ok((c.chain.clone(), c.key.clone_key()))
            }
            (Source::File(cert), Source::File(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("certificate {cert}: {e}"))?;
                let key =
                    PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key {key}: {e}"))?;
                Ok((chain, key))
            }
            (Source::Credential(name), _) => {
                let (chain, key) = self.secrets.certificate(name)?;
                let chain = CertificateDer::pem_slice_iter(&chain)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("credential {name:?} certificate: {e}"))?;
                let key = PrivateKeyDer::from_pem_slice(&key)
                    .map_err(|e| format!("credential {name:?} key: {e}"))?;
                Ok((chain, key))
            }
            (Source::File(_), _) => Err("a certificate file without a key file".into()),
        }
    }

    /// The roots a peer must chain to: the mesh's, or every certificate of
    /// a CA bundle file.
    fn roots(
        &self,
        credentials: &Option<Arc<Credentials>>,
        source: &Source,
    ) -> Result<Vec<CertificateDer<'static>>, String> {
        match source {
            Source::Mesh => Ok(vec![self.mesh(credentials)?.root.clone()]),
            Source::File(path) => CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("roots {path}: {e}")),
            Source::Credential(name) => CertificateDer::pem_slice_iter(&self.secrets.ca(name)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("credential {name:?} CA: {e}")),
        }
    }

    fn signatures(&self) -> HandshakeSignatures {
        HandshakeSignatures::new(self.provider.clone())
    }

    /// The server side of a filter chain's TLS.
    pub fn server(&self, tls: &Tls) -> Result<Arc<ServerConfig>, String> {
        let credentials = self.credentials.borrow().clone();
        let mut cache = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        cache.get_or_build(&credentials, tls, files(tls, &self.secrets), || {
            let source = tls
                .certificate
                .as_ref()
                .ok_or("a TLS filter chain without a certificate")?;
            let (chain, key) = self.certificate(&credentials, source)?;
            let builder = ServerConfig::builder_with_provider(self.provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?;
            let required = tls.require_client_certificate;
            let mut config = match &tls.roots {
                Some(Source::Mesh) => builder.with_client_cert_verifier(Arc::new(PeerVerifier {
                    root: self.mesh(&credentials)?.root.clone(),
                    identities: tls.peer_identities.clone(),
                    required,
                    signatures: self.signatures(),
                })),
                Some(file) => builder.with_client_cert_verifier(Arc::new(WebPkiVerifier::new(
                    &self.roots(&credentials, file)?,
                    tls.peer_identities.clone(),
                    required,
                    self.signatures(),
                )?)),
                None => builder.with_no_client_auth(),
            }
            .with_single_cert(chain, key)
            .map_err(|e| e.to_string())?;
            config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
            // Sidecars offer `istio` alone for plain TCP and HTTP/1.1.
            if !tls.alpn.iter().any(|p| p == MESH_ALPN) {
                config.alpn_protocols.push(MESH_ALPN.as_bytes().to_vec());
            }
            Ok(config)
        })
    }

    /// The client side of a cluster's TLS.
    pub fn client(&self, tls: &Tls) -> Result<Arc<ClientConfig>, String> {
        let credentials = self.credentials.borrow().clone();
        let mut cache = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        cache.get_or_build(&credentials, tls, files(tls, &self.secrets), || {
            // A server outside the mesh chains to the roots config names,
            // else to the system's.
            let verifier: Arc<dyn ServerCertVerifier> = match &tls.roots {
                Some(Source::Mesh) => Arc::new(PeerVerifier {
                    root: self.mesh(&credentials)?.root.clone(),
                    identities: tls.peer_identities.clone(),
                    required: true,
                    signatures: self.signatures(),
                }),
                roots => {
                    let roots = match roots {
                        Some(file) => self.roots(&credentials, file)?,
                        None => web_pki::system_roots()?,
                    };
                    Arc::new(WebPkiVerifier::new(
                        &roots,
                        tls.peer_identities.clone(),
                        true,
                        self.signatures(),
                    )?)
                }
            };
            let builder = ClientConfig::builder_with_provider(self.provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(verifier);
            let mut config = match &tls.certificate {
                Some(source) => {
                    let (chain, key) = self.certificate(&credentials, source)?;
                    builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| e.to_string())?
                }
                None => builder.with_no_client_auth(),
            };
            config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
            config.enable_sni = !tls.sni.is_empty();
            Ok(config)
        })
    }
}

/// Checks a peer's chain against the mesh root and its SPIFFE identity
/// against those accepted, for either side of a connection.
#[derive(Debug)]
struct PeerVerifier {
    root: CertificateDer<'static>,
    identities: Vec<String>,
    required: bool,
    signatures: HandshakeSignatures,
}

impl PeerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        usage: Usage,
    ) -> Result<(), rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let identity =
            spiffe::verify(&chain, &self.root, &[], usage).map_err(rustls::Error::General)?;
        let uri = identity.to_string();
        if !self.identities.is_empty() && !self.identities.contains(&uri) {
            return Err(rustls::Error::General(format!(
                "peer {uri} is not one of {:?}",
                self.identities
            )));
        }
        Ok(())
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, Usage::Client)
            .map(|()| ClientCertVerified::assertion())
    }

    component::delegate_handshake_signatures!();
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, Usage::Server)
            .map(|()| ServerCertVerified::assertion())
    }

    component::delegate_handshake_signatures!();
}

/// What a TLS client's ClientHello asks for, read without consuming it
/// (so a connection that is not the mesh's can still be passed through
/// untouched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The server name (SNI), lowercase.
    pub sni: Option<String>,
    /// The ALPN protocols offered.
    pub alpn: Vec<String>,
}

/// The client's ClientHello; `None` when none arrives.
pub async fn peek_hello(stream: &TcpStream) -> Option<Hello> {
    let mut buf = vec![0u8; MAX_HELLO];
    // A peek does not take what it reads, so the socket stays readable:
    // more of the hello is waited for with a growing pause, and parsed
    // again only once more has come. The caller bounds the wait.
    let (mut seen, mut pause) = (0, Duration::from_millis(1));
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if n == seen {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
            continue;
        }
        seen = n;
        match read_hello(&buf[..n]) {
            HelloRead::Complete(hello) => return Some(hello),
            HelloRead::Partial => {}
            HelloRead::NotHello => return None,
        }
    }
}

/// Most bytes of a ClientHello read; a longer one is not the mesh's.
pub const MAX_HELLO: usize = 16 * 1024;

/// What the bytes a client has sent so far make of a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloRead {
    Complete(Hello),
    /// A hello, as far as it goes: more is needed.
    Partial,
    /// Not a ClientHello, or one over [`MAX_HELLO`].
    NotHello,
}

/// Reads a ClientHello from the first bytes of a connection.
pub fn read_hello(bytes: &[u8]) -> HelloRead {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut input = bytes;
    if acceptor.read_tls(&mut input).is_err() {
        return HelloRead::NotHello;
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            let alpn = hello
                .alpn()
                .map(|protocols| {
                    protocols
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .collect()
                })
                .unwrap_or_default();
            let sni = hello.server_name().map(str::to_ascii_lowercase);
            HelloRead::Complete(Hello { sni, alpn })
        }
        Ok(None) if bytes.len() < MAX_HELLO => HelloRead::Partial,
        _ => HelloRead::NotHello,
    }
}

/// The identity a TLS peer proved, if it presented a certificate.
pub fn peer_identity(certificates: Option<&[CertificateDer<'static>]>) -> Option<Identity> {
    spiffe::identity_of(certificates?.first()?).ok()
}

/// A connection to an upstream, in the clear or in TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// Opens a connection to `addr`, with TLS when `tls` says so.
    pub async fn connect(
        addr: std::net::SocketAddr,
        timeout: Duration,
        tls: Option<(&Tls, &TlsContext)>,
    ) -> Result<Self, crate::upstream::BoxError> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connecting to {addr} timed out"))??;
        let _ = tcp.set_nodelay(true);
        let Some((settings, context)) = tls else {
            return Ok(Stream::Plain(tcp));
        };
        let config = context.client(settings)?;
        let name = if settings.sni.is_empty() {
            ServerName::IpAddress(addr.ip().into())
        } else {
            ServerName::try_from(settings.sni.clone())?
        };
        let connecting = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
        let stream = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| format!("TLS handshake with {addr} timed out"))??;
        Ok(Stream::Tls(Box::new(stream)))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl hyper_util::client::legacy::connect::Connection for Stream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        let connected = hyper_util::client::legacy::connect::Connected::new();
        match self {
            Stream::Tls(s) if s.get_ref().1.alpn_protocol() == Some(b"h2") => {
                connected.negotiated_h2()
            }
            _ => connected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `host` and its key, written to `dir`.
    fn write(dir: &std::path::Path, host: &str) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![host.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    }

    #[test]
    fn a_rotated_certificate_file_is_read_again_and_a_torn_one_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = |f: &str| dir.path().join(f).display().to_string();
        let tls = Tls {
            certificate: Some((Source::File(path("tls.crt")), Source::File(path("tls.key")))),
            roots: None,
            peer_identities: Vec::new(),
            alpn: Vec::new(),
            sni: String::new(),
            require_client_certificate: false,
        };
        let (_, credentials) = tokio::sync::watch::channel(None);
        let context = TlsContext::new(credentials, Arc::default());
        write(dir.path(), "a.example");
        let first = context.server(&tls).unwrap();
        assert!(Arc::ptr_eq(&first, &context.server(&tls).unwrap()));

        write(dir.path(), "b.example");
        let rotated = context.server(&tls).unwrap();
        assert!(!Arc::ptr_eq(&first, &rotated));

        // A new key beside the old certificate: the last good config.
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
        assert!(Arc::ptr_eq(&rotated, &context.server(&tls).unwrap()));
    }

    /// A chain as Citadel issues it (leaf for `identity`, then `root`),
    /// and the leaf's key.
    fn issue(root: &rcgen::Issuer<'_, rcgen::KeyPair>, root_pem: &str) -> Credentials {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/a".try_into().unwrap(),
        )];
        let leaf = params.signed_by(&key, root).unwrap();
        Credentials::issued(&[leaf.pem(), root_pem.to_string()], &key).unwrap()
    }

    /// Found by `meshctl bench chaos`: renewed credentials allocated where
    /// freed ones had been passed for those the cached configs were built
    /// with, and the proxy went on presenting an expired certificate.
    #[test]
    fn every_renewal_is_presented_however_the_credentials_are_allocated() {
        let root_key = rcgen::KeyPair::generate().unwrap();
        let mut root_params = rcgen::CertificateParams::default();
        root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root_pem = root_params.self_signed(&root_key).unwrap().pem();
        let root = rcgen::Issuer::new(root_params, root_key);
        let mesh = Tls {
            certificate: Some((Source::Mesh, Source::Mesh)),
            roots: Some(Source::Mesh),
            peer_identities: Vec::new(),
            alpn: vec!["istio".into()],
            sni: String::new(),
            require_client_certificate: false,
        };
        let (tx, credentials) = tokio::sync::watch::channel(None);
        let context = TlsContext::new(credentials, Arc::default());
        let presented = |config: &ClientConfig| {
            let key = config
                .client_auth_cert_resolver
                .resolve(&[], &[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
                .expect("a client certificate");
            key.cert[0].clone()
        };
        for _ in 0..50 {
            tx.send_replace(Some(Arc::new(issue(&root, &root_pem))));
            context.client(&mesh).unwrap();
            // Two renewals between handshakes: the second may be allocated
            // where the first built with was.
            tx.send_replace(Some(Arc::new(issue(&root, &root_pem))));
            let current = issue(&root, &root_pem);
            let leaf = current.chain[0].clone();
            tx.send_replace(Some(Arc::new(current)));
            assert_eq!(presented(&context.client(&mesh).unwrap()), leaf);
        }
    }
}
