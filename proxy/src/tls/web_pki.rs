//! Peers outside the mesh, checked as the web checks them: a chain to one
//! of the trusted roots (a CA bundle a DestinationRule or a Gateway names,
//! else the system's roots), then a name: one of the subject alt names
//! config lists (DNS or URI), else, for a server, the name the proxy asked
//! for by SNI.

use std::sync::OnceLock;

use component::tls::HandshakeSignatures;
use rustls::{
    DistinguishedName,
    client::danger::{ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use webpki::EndEntityCert;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// The system's roots, read once.
pub fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
    static ROOTS: OnceLock<Result<Vec<CertificateDer<'static>>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                return Err(format!("no system roots: {:?}", found.errors));
            }
            Ok(found.certs)
        })
        .clone()
}

#[derive(Debug)]
pub struct WebPkiVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    /// Subject alt names accepted; empty: a server's SNI name.
    names: Vec<String>,
    /// Downstream: refuse clients without a certificate.
    required: bool,
    signatures: HandshakeSignatures,
}

impl WebPkiVerifier {
    pub fn new(
        roots: &[CertificateDer<'_>],
        names: Vec<String>,
        required: bool,
        signatures: HandshakeSignatures,
    ) -> Result<Self, String> {
        let anchors = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| format!("a trusted root is unusable: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if anchors.is_empty() {
            return Err("no trusted roots".into());
        }
        Ok(Self {
            anchors,
            names,
            required,
            signatures,
        })
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        usage: webpki::KeyUsage,
        server_name: Option<&ServerName<'_>>,
    ) -> Result<(), rustls::Error> {
        let cert = EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("the peer's certificate: {e}")))?;
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            intermediates,
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("the peer's certificate: {e}")))?;
        if !self.names.is_empty() {
            let presented = subject_alt_names(end_entity);
            return match self.names.iter().find(|n| presented.contains(n)) {
                Some(_) => Ok(()),
                None => Err(rustls::Error::General(format!(
                    "the peer's certificate names {presented:?}, none of {:?}",
                    self.names
                ))),
            };
        }
        match server_name {
            Some(name) => cert
                .verify_is_valid_for_subject_name(name)
                .map_err(|e| rustls::Error::General(format!("the server's certificate: {e}"))),
            None => Ok(()),
        }
    }
}

/// The DNS names and URIs a certificate's subject alt names hold.
fn subject_alt_names(der: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(sans)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    sans.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(name) => Some(name.to_ascii_lowercase()),
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

impl ServerCertVerifier for WebPkiVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let usage = webpki::KeyUsage::server_auth();
        self.check(end_entity, intermediates, usage, Some(server_name))
            .map(|()| ServerCertVerified::assertion())
    }

    component::delegate_handshake_signatures!();
}

impl ClientCertVerifier for WebPkiVerifier {
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
        let usage = webpki::KeyUsage::client_auth();
        self.check(end_entity, intermediates, usage, None)
            .map(|()| ClientCertVerified::assertion())
    }

    component::delegate_handshake_signatures!();
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

    use super::*;

    /// A CA, and a leaf it signed for `names`.
    fn signed(names: &[SanType]) -> (CertificateDer<'static>, CertificateDer<'static>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let mut leaf = CertificateParams::new(Vec::new()).unwrap();
        leaf.subject_alt_names = names.to_vec();
        let leaf = leaf
            .signed_by(&KeyPair::generate().unwrap(), &issuer)
            .unwrap();
        (cert.der().clone(), leaf.der().clone())
    }

    fn verifier(root: &CertificateDer<'_>, names: &[&str]) -> WebPkiVerifier {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let names = names.iter().map(|n| n.to_string()).collect();
        WebPkiVerifier::new(
            std::slice::from_ref(root),
            names,
            true,
            HandshakeSignatures::new(provider),
        )
        .unwrap()
    }

    fn server(v: &WebPkiVerifier, leaf: &CertificateDer<'_>, sni: &str) -> Result<(), String> {
        let name = ServerName::try_from(sni.to_string()).unwrap();
        v.verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_server_is_checked_by_its_chain_and_the_name_asked_for() {
        let dns = |n: &str| SanType::DnsName(n.try_into().unwrap());
        let (root, leaf) = signed(&[dns("api.example.com")]);
        let v = verifier(&root, &[]);
        server(&v, &leaf, "api.example.com").unwrap();
        let wrong = server(&v, &leaf, "other.example.com").unwrap_err();
        assert!(wrong.contains("server's certificate"), "{wrong}");

        let (other_root, _) = signed(&[dns("api.example.com")]);
        let untrusted = server(&verifier(&other_root, &[]), &leaf, "api.example.com");
        assert!(untrusted.is_err());
    }

    #[test]
    fn listed_subject_alt_names_stand_in_for_the_name_asked_for() {
        let uri = SanType::URI("spiffe://partner.example/ns/a/sa/b".try_into().unwrap());
        let (root, leaf) = signed(&[
            SanType::DnsName("edge.example.com".try_into().unwrap()),
            uri,
        ]);
        let by_dns = verifier(&root, &["edge.example.com"]);
        server(&by_dns, &leaf, "anything.example").unwrap();
        let by_uri = verifier(&root, &["spiffe://partner.example/ns/a/sa/b"]);
        by_uri
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .unwrap();
        let neither = verifier(&root, &["billing.example.com"]);
        let refused = server(&neither, &leaf, "edge.example.com").unwrap_err();
        assert!(refused.contains("none of"), "{refused}");
    }
}
