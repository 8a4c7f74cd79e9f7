//! Citadel over real gRPC: certificates issued, validated as a client and
//! a server would, used for a mutual TLS handshake; refusals with their
//! status; the root kept across restarts; plugged-in CA files.

use std::{path::Path, sync::Arc, time::Duration};

use citadel::{Citadel as Loaded, CitadelArgs};
use component::{Admin, CancellationToken};
use mesh_api::pb::istio::v1::auth::{
    CsrRequest, IstioCertificateRequest, istio_ca_service_client::IstioCaServiceClient,
    istio_certificate_service_client::IstioCertificateServiceClient,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request, transport::Channel};

mod common;

use common::{csr, der, inspect, validate};

const TOKENS: &str = "shop/reviews reviews-token\nshop/ratings ratings-token\n";

struct Citadel {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
    root: String,
}

impl Drop for Citadel {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn args(dir: &Path) -> CitadelArgs {
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, TOKENS).unwrap();
    let ca_dir = dir.join("ca").display().to_string();
    let tokens = tokens.display().to_string();
    common::parse_args(&[
        "--ca-dir",
        &ca_dir,
        "--max-workload-cert-ttl",
        "7d",
        "--grpc-hostname",
        "localhost",
        "--bootstrap-tokens",
        &tokens,
    ])
}

async fn start(args: CitadelArgs) -> Citadel {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let admin = Admin::new("citadel");
    // Loaded: the CA files exist, and requests wait on the bound listener
    // until the server takes them.
    let loaded = Loaded::load(&args, &admin, None).unwrap();
    let serving = stop.clone();
    tokio::spawn(async move { loaded.serve(listener, &admin, serving).await });
    let root = std::fs::read_to_string(args.ca_dir.join("root-cert.pem")).unwrap();
    Citadel { addr, stop, root }
}

impl Citadel {
    /// A TLS channel trusting the mesh root, presenting `identity` (a
    /// chain and its key) when given.
    async fn channel(&self, identity: Option<(&[String], &KeyPair)>) -> Channel {
        common::tls_channel(self.addr, &self.root, identity).await
    }
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn create(
    citadel: &Citadel,
    token: &str,
    csr: &str,
    validity_seconds: i64,
) -> Result<Vec<String>, tonic::Status> {
    let mut client = IstioCertificateServiceClient::new(citadel.channel(None).await);
    let request = IstioCertificateRequest {
        csr: csr.into(),
        subject_id: String::new(),
        validity_duration: validity_seconds,
    };
    Ok(client
        .create_certificate(with_token(request, token))
        .await?
        .into_inner()
        .cert_chain)
}

fn root_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("ca").join("root-cert.pem")).unwrap()
}

#[tokio::test]
async fn issued_certificates_carry_the_caller_identity_and_complete_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let citadel = start(args(dir.path())).await;
    let root = root_of(dir.path());

    // The CSR asks for DNS names too; only the caller's identity is kept.
    let reviews_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/shop/sa/reviews"
            .try_into()
            .unwrap(),
    ));
    let reviews_csr = params
        .serialize_request(&reviews_key)
        .unwrap()
        .pem()
        .unwrap();
    let reviews = create(&citadel, "reviews-token", &reviews_csr, 3600)
        .await
        .unwrap();
    assert_eq!(reviews.len(), 2, "leaf and root");
    assert_eq!(der(reviews.last().unwrap()), der(&root), "root last");
    validate(&reviews, &root);
    let (sans, left) = inspect(&reviews[0]);
    assert_eq!(sans, ["URI(spiffe://cluster.local/ns/shop/sa/reviews)"]);
    assert!(common::holds_key(&reviews[0], &reviews_key));
    assert!(
        left <= Duration::from_secs(3600) && left > Duration::from_secs(3500),
        "{left:?}"
    );

    // The default lifetime, and the older API.
    let (ratings_key, ratings_csr) = csr(None);
    let mut old = IstioCaServiceClient::new(citadel.channel(None).await);
    let response = old
        .handle_csr(with_token(
            CsrRequest {
                csr_pem: ratings_csr.into_bytes(),
                ..Default::default()
            },
            "ratings-token",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(response.is_approved);
    let ratings = vec![
        String::from_utf8(response.signed_cert).unwrap(),
        String::from_utf8(response.cert_chain).unwrap(),
    ];
    validate(&ratings, &root);
    let (sans, left) = inspect(&ratings[0]);
    assert_eq!(sans, ["URI(spiffe://cluster.local/ns/shop/sa/ratings)"]);
    assert!(left <= Duration::from_secs(86400) && left > Duration::from_secs(86000));

    // reviews serves, ratings connects; each checks the other's identity.
    let peer = mutual_tls(
        (&reviews, &reviews_key),
        (&ratings, &ratings_key),
        &root,
        "spiffe://cluster.local/ns/shop/sa/reviews",
    )
    .await;
    assert_eq!(peer, "spiffe://cluster.local/ns/shop/sa/ratings");
}

#[tokio::test]
async fn citadels_on_intermediates_of_one_root_trust_each_others_workloads() {
    // Two clusters: each Citadel signs with its own intermediate, made
    // under one shared root (generated on first use).
    let shared = tempfile::tempdir().unwrap();
    let options = |dir: &Path| citadel::ca::CaOptions {
        dir: dir.to_path_buf(),
        self_signed: true,
        key_algorithm: Default::default(),
        trust_domain: "cluster.local".into(),
        root_ttl: Duration::from_secs(86400 * 365),
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(3600),
    };
    let root_ca = citadel::ca::Ca::load_or_create(&options(shared.path())).unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (dir, name) in [(&a, "cluster a"), (&b, "cluster b")] {
        root_ca
            .create_intermediate(&dir.path().join("ca"), name, Duration::from_secs(86400))
            .unwrap();
    }
    let (mut args_a, mut args_b) = (args(a.path()), args(b.path()));
    args_a.self_signed_ca = false;
    args_b.self_signed_ca = false;
    let (citadel_a, citadel_b) = (start(args_a).await, start(args_b).await);
    let root = root_ca.root_pem().to_string();
    assert_eq!(root_of(a.path()), root);

    let (reviews_key, reviews_csr) = csr(None);
    let reviews = create(&citadel_a, "reviews-token", &reviews_csr, 0)
        .await
        .unwrap();
    let (ratings_key, ratings_csr) = csr(None);
    let ratings = create(&citadel_b, "ratings-token", &ratings_csr, 0)
        .await
        .unwrap();
    assert_eq!(reviews.len(), 3, "leaf, intermediate, root");
    assert_ne!(der(&reviews[1]), der(&ratings[1]), "an intermediate each");
    assert_eq!(der(&reviews[2]), der(&ratings[2]), "one root");
    validate(&reviews, &root);
    validate(&ratings, &root);

    // A workload of B connects to one of A; each checks the other's
    // identity through the other's intermediate.
    let peer = mutual_tls(
        (&reviews, &reviews_key),
        (&ratings, &ratings_key),
        &root,
        "spiffe://cluster.local/ns/shop/sa/reviews",
    )
    .await;
    assert_eq!(peer, "spiffe://cluster.local/ns/shop/sa/ratings");
}

#[tokio::test]
async fn refusals_carry_their_status_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let citadel = start(args(dir.path())).await;
    let (_, other) = csr(Some("spiffe://cluster.local/ns/shop/sa/ratings"));
    let (_, plain) = csr(None);

    let denied = create(&citadel, "reviews-token", &other, 0)
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("sa/ratings") && denied.message().contains("sa/reviews"),
        "{}",
        denied.message()
    );

    let unknown = create(&citadel, "no-such-token", &plain, 0)
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert!(unknown.message().contains("token"), "{}", unknown.message());

    let malformed = create(
        &citadel,
        "reviews-token",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert!(
        malformed.message().contains("CSR"),
        "{}",
        malformed.message()
    );

    let too_long = create(&citadel, "reviews-token", &plain, 30 * 86400)
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument);
    assert!(
        too_long.message().contains("maximum"),
        "{}",
        too_long.message()
    );

    // A CSR altered after it was signed: its signature no longer holds.
    let (_, signed) = csr(None);
    let mut bytes = pem::parse(&signed).unwrap().into_contents();
    *bytes.last_mut().unwrap() ^= 1;
    let altered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", bytes));
    let altered = create(&citadel, "reviews-token", &altered, 0)
        .await
        .unwrap_err();
    assert_eq!(altered.code(), Code::InvalidArgument);
    assert!(
        altered.message().contains("signature"),
        "{}",
        altered.message()
    );
}

/// Renews over mTLS with the certificate held: no token needed, same
/// identity only.
async fn renew(
    citadel: &Citadel,
    held: (&[String], &KeyPair),
    csr: &str,
) -> Result<Vec<String>, tonic::Status> {
    let mut client = IstioCertificateServiceClient::new(citadel.channel(Some(held)).await);
    let request = IstioCertificateRequest {
        csr: csr.into(),
        ..Default::default()
    };
    Ok(client
        .create_certificate(request)
        .await?
        .into_inner()
        .cert_chain)
}

#[tokio::test]
async fn a_valid_certificate_renews_its_own_identity_only() {
    let dir = tempfile::tempdir().unwrap();
    let citadel = start(args(dir.path())).await;
    let (key, request) = csr(None);
    let first = create(&citadel, "reviews-token", &request, 0)
        .await
        .unwrap();

    let (new_key, new_request) = csr(Some("spiffe://cluster.local/ns/shop/sa/reviews"));
    let renewed = renew(&citadel, (&first, &key), &new_request).await.unwrap();
    validate(&renewed, &citadel.root);
    assert_eq!(
        inspect(&renewed[0]).0,
        ["URI(spiffe://cluster.local/ns/shop/sa/reviews)"]
    );
    // The renewed certificate renews in turn.
    renew(&citadel, (&renewed, &new_key), &request)
        .await
        .unwrap();

    let (_, other) = csr(Some("spiffe://cluster.local/ns/shop/sa/ratings"));
    let denied = renew(&citadel, (&first, &key), &other).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn expired_or_foreign_certificates_do_not_renew() {
    let dir = tempfile::tempdir().unwrap();
    let citadel = start(args(dir.path())).await;
    let (_, request) = csr(None);
    let identity = SanType::URI(
        "spiffe://cluster.local/ns/shop/sa/reviews"
            .try_into()
            .unwrap(),
    );

    // Signed by the mesh CA itself, but expired an hour ago.
    let ca_dir = dir.path().join("ca");
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap()).unwrap();
    let ca = Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(ca_dir.join("ca-cert.pem")).unwrap(),
        ca_key,
    )
    .unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![identity.clone()];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(25);
    params.not_after = now - time::Duration::hours(1);
    let expired = params.signed_by(&key, &ca).unwrap().pem();
    let refused = renew(&citadel, (&[expired, citadel.root.clone()], &key), &request)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("expired"),
        "{}",
        refused.message()
    );

    // Valid, with the right identity, from another root.
    let other_root_key = KeyPair::generate().unwrap();
    let other_root = Issuer::new(ca_params("another mesh"), other_root_key);
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![identity];
    let foreign = params.signed_by(&key, &other_root).unwrap().pem();
    let refused = renew(&citadel, (&[foreign], &key), &request)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("does not chain"),
        "{}",
        refused.message()
    );
}

#[tokio::test]
async fn the_root_is_generated_once_and_kept_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let first = start(args(dir.path())).await;
    let root = root_of(dir.path());
    let (_, request) = csr(None);
    let before = create(&first, "reviews-token", &request, 0).await.unwrap();
    drop(first);

    let second = start(args(dir.path())).await;
    assert_eq!(root_of(dir.path()), root, "same root after a restart");
    let after = create(&second, "reviews-token", &request, 0).await.unwrap();
    validate(&before, &root);
    validate(&after, &root);

    use std::os::unix::fs::PermissionsExt;
    let key = std::fs::metadata(dir.path().join("ca").join("ca-key.pem")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
}

#[tokio::test]
async fn an_rsa_root_signs_as_well() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = args(dir.path());
    args.ca_key_algorithm = citadel::ca::KeyAlgorithm::Rsa2048;
    let citadel = start(args).await;
    let root = der(&citadel.root).remove(0);
    let (_, parsed) = x509_parser::parse_x509_certificate(&root).unwrap();
    assert_eq!(
        parsed.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION
    );
    let (_, request) = csr(None);
    let chain = create(&citadel, "reviews-token", &request, 0)
        .await
        .unwrap();
    validate(&chain, &citadel.root);
}

#[tokio::test]
async fn plugged_in_certificates_chain_to_the_external_root() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    // An external root and, under it, the intermediate Citadel signs with.
    let root_key = KeyPair::generate().unwrap();
    let mut root_params = ca_params("external root");
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params("citadel intermediate")
        .signed_by(&ca_key, &root_issuer)
        .unwrap();
    std::fs::write(ca_dir.join("ca-cert.pem"), ca.pem()).unwrap();
    std::fs::write(ca_dir.join("ca-key.pem"), ca_key.serialize_pem()).unwrap();
    std::fs::write(ca_dir.join("cert-chain.pem"), ca.pem()).unwrap();
    std::fs::write(ca_dir.join("root-cert.pem"), root.pem()).unwrap();

    let mut args = args(dir.path());
    args.self_signed_ca = false;
    let citadel = start(args).await;
    let (_, request) = csr(None);
    let chain = create(&citadel, "reviews-token", &request, 0)
        .await
        .unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(der(&chain[1]), der(&ca.pem()));
    assert_eq!(der(&chain[2]), der(&root.pem()));
    validate(&chain, &root.pem());
}

#[tokio::test]
async fn missing_or_partial_ca_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut no_self_signing = args(dir.path());
    no_self_signing.self_signed_ca = false;
    let error = Loaded::load(&no_self_signing, &Admin::new("citadel"), None)
        .err()
        .unwrap();
    assert!(error.to_string().contains("self-signing is off"), "{error}");

    std::fs::create_dir_all(dir.path().join("ca")).unwrap();
    std::fs::write(dir.path().join("ca").join("ca-cert.pem"), "x").unwrap();
    let error = Loaded::load(&args(dir.path()), &Admin::new("citadel"), None)
        .err()
        .unwrap();
    assert!(
        error.to_string().contains("holds only ca-cert.pem"),
        "{error}"
    );
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A TLS handshake between `server` and `client` (chains and keys), both
/// requiring a certificate of the other chaining to `root`; the client also
/// checks the server's SPIFFE identity. Returns the client identity the
/// server saw.
async fn mutual_tls(
    server: (&[String], &KeyPair),
    client: (&[String], &KeyPair),
    root: &str,
    server_identity: &str,
) -> String {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(root).remove(0)).unwrap();
    let roots = Arc::new(roots);
    let certs = |chain: &[String]| -> Vec<CertificateDer<'static>> {
        chain[..chain.len() - 1]
            .iter()
            .flat_map(|c| der(c))
            .collect()
    };
    let key = |k: &KeyPair| PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.serialize_der()));

    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .unwrap();
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(certs(server.0), key(server.1))
        .unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeVerifier {
            roots: roots.clone(),
            identity: server_identity.to_string(),
            provider: provider.clone(),
        }))
        .with_client_auth_cert(certs(client.0), key(client.1))
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        tls.write_all(b"hello").await.unwrap();
        tls.shutdown().await.unwrap();
        peer
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let name = rustls::pki_types::ServerName::try_from("reviews.shop").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let mut greeting = Vec::new();
    tls.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"hello");
    let peer = served.await.unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&peer).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    match &san.value.general_names[..] {
        [x509_parser::extensions::GeneralName::URI(uri)] => uri.to_string(),
        other => panic!("one URI SAN expected, got {other:?}"),
    }
}

/// Verifies a server by its chain to the mesh root and its SPIFFE identity
/// (mesh certificates carry no DNS names).
#[derive(Debug)]
struct SpiffeVerifier {
    roots: Arc<rustls::RootCertStore>,
    identity: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(end_entity)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let matches = parsed
            .subject_alternative_name()
            .ok()
            .flatten()
            .is_some_and(|san| {
                san.value.general_names.iter().any(|n| {
                matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == self.identity)
            })
            });
        if !matches {
            return Err(rustls::Error::General(format!(
                "peer is not {}",
                self.identity
            )));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
