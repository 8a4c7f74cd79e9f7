//! TLS for the CA API. Citadel signs its own serving certificate (clients
//! verify it against the root they trust) and renews it well before it
//! expires. Client certificates are asked for but not required: a workload
//! without one authenticates with a token, and one that renews proves its
//! identity with the certificate it holds. The chain of a client
//! certificate is checked by the service, not the handshake, so that an
//! expired or foreign certificate is refused with a gRPC status saying so.

use std::{net::IpAddr, sync::Arc, time::Duration};

use component::{
    CancellationToken,
    tls::{HandshakeSignatures, TlsListener},
};
use rcgen::{KeyPair, SanType};
use rustls::{
    DistinguishedName, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use tokio::{net::TcpListener, sync::watch};

use crate::ca::Ca;

/// A TLS listener serving a certificate from `ca` for `hostnames`,
/// renewed at half its lifetime until `shutdown`.
pub fn listener(
    tcp: TcpListener,
    ca: Arc<Ca>,
    hostnames: Vec<String>,
    lifetime: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<TlsListener> {
    let (tx, configs) = watch::channel(server_config(&ca, &hostnames, lifetime)?);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(lifetime / 2) => {}
                _ = shutdown.cancelled() => return,
            }
            match server_config(&ca, &hostnames, lifetime) {
                Ok(config) => {
                    tracing::info!("serving certificate renewed");
                    tx.send_replace(config);
                }
                // The current one is still valid for half its lifetime.
                Err(e) => tracing::error!("serving certificate not renewed: {e:#}"),
            }
        }
    });
    Ok(TlsListener::from_configs(tcp, configs))
}

fn server_config(
    ca: &Ca,
    hostnames: &[String],
    lifetime: Duration,
) -> anyhow::Result<Arc<ServerConfig>> {
    let key = KeyPair::generate()?;
    let sans = hostnames
        .iter()
        .map(|h| match h.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(h.as_str().try_into()?)),
        })
        .collect::<Result<Vec<_>, rcgen::Error>>()
        .map_err(|e| anyhow::anyhow!("--grpc-hostname: {e}"))?;
    let chain = ca.issue(&key, sans, lifetime)?;
    // The chain the client needs, without the root it already trusts.
    let certs: Vec<CertificateDer<'static>> = chain[..chain.len() - 1]
        .iter()
        .flat_map(|pem| pem::parse_many(pem).unwrap_or_default())
        .map(|block| CertificateDer::from(block.into_contents()))
        .collect();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(ClientCertLater {
            signatures: HandshakeSignatures::new(provider),
        }))
        .with_single_cert(
            certs,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Asks for a client certificate and checks that the client holds its
/// key; whether the certificate is any good is for the service to say.
#[derive(Debug)]
struct ClientCertLater {
    signatures: HandshakeSignatures,
}

impl ClientCertVerifier for ClientCertLater {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    component::delegate_handshake_signatures!();
}
