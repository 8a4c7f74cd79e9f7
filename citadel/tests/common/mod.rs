//! What the Citadel tests share: flags as the binary parses them, CSRs,
//! TLS channels to the CA API, and checks of the certificates issued.

// Each test file uses a part.
#![allow(dead_code)]

use std::time::{Duration, SystemTime};

use citadel::CitadelArgs;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use rustls::pki_types::{CertificateDer, UnixTime};
use tonic::transport::{Channel, ClientTlsConfig};

/// Citadel's flags as the binary parses them, defaults and all.
pub fn parse_args(flags: &[&str]) -> CitadelArgs {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: CitadelArgs,
    }
    <Cli as clap::Parser>::parse_from(std::iter::once("citadel").chain(flags.iter().copied())).args
}

/// A key and a CSR for it, asking for `uri` when given.
pub fn csr(uri: Option<&str>) -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uri
        .map(|u| SanType::URI(u.try_into().unwrap()))
        .into_iter()
        .collect();
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

/// A TLS channel to the CA API at `addr`, trusting `root`, presenting
/// `identity` (a chain and its key) when given.
pub async fn tls_channel(
    addr: std::net::SocketAddr,
    root: &str,
    identity: Option<(&[String], &KeyPair)>,
) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(root))
        .domain_name("localhost");
    if let Some((chain, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            chain.concat(),
            key.serialize_pem(),
        ));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Whether the certificate `pem` is for `key`.
pub fn holds_key(pem: &str, key: &KeyPair) -> bool {
    let der = der(pem).remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.public_key().raw == key.subject_public_key_info().as_slice()
}

pub fn der(pem: &str) -> Vec<CertificateDer<'static>> {
    pem::parse_many(pem)
        .unwrap()
        .into_iter()
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect()
}

/// Validates `chain` (leaf first, root last) against its root as a client
/// and as a server certificate would be.
pub fn validate(chain: &[String], root: &str) {
    let leaf = der(&chain[0]).remove(0);
    let intermediates: Vec<CertificateDer> = chain[1..chain.len() - 1]
        .iter()
        .flat_map(|c| der(c))
        .collect();
    let root = der(root).remove(0);
    let anchor = webpki::anchor_from_trusted_cert(&root).unwrap();
    let leaf = webpki::EndEntityCert::try_from(&leaf).unwrap();
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            std::slice::from_ref(&anchor),
            &intermediates,
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .expect("the leaf chains to the root");
    }
}

/// The URI SANs of a PEM certificate and its remaining lifetime.
pub fn inspect(pem: &str) -> (Vec<String>, Duration) {
    let der = der(pem).remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let uris = cert
        .subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| n.to_string())
                .collect()
        })
        .unwrap_or_default();
    let not_after =
        SystemTime::UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp() as u64);
    let left = not_after.duration_since(SystemTime::now()).unwrap();
    (uris, left)
}
