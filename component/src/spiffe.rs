//! SPIFFE workload identities, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! and the check that a certificate chain proves one: Citadel checks its
//! callers with it, and proxies check each other with it (mesh peers are
//! named by URI SAN, not by host name, so the usual TLS host check does
//! not apply).

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use rustls::pki_types::{CertificateDer, UnixTime};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// Parses a SPIFFE URI of Istio's form.
    pub fn parse(uri: &str) -> Result<Self, String> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{uri:?} is not a spiffe:// URI"))?;
        match rest.split('/').collect::<Vec<_>>()[..] {
            [domain, "ns", ns, "sa", sa] if [domain, ns, sa].iter().all(|p| !p.is_empty()) => {
                Ok(Self::new(domain, ns, sa))
            }
            _ => Err(format!(
                "{uri:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Which side of a connection a certificate is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Client,
    Server,
}

/// The identity `chain` (leaf first) proves: the leaf must chain to `root`
/// (through its own intermediates or `intermediates`), be valid now for
/// `usage`, and carry exactly one URI SAN, a SPIFFE identity. The error
/// says which of these failed.
pub fn verify(
    chain: &[CertificateDer<'_>],
    root: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    usage: Usage,
) -> Result<Identity, String> {
    let what = match usage {
        Usage::Client => "client certificate",
        Usage::Server => "server certificate",
    };
    let (leaf, presented) = chain
        .split_first()
        .ok_or_else(|| format!("no {what} was presented"))?;
    let anchor = webpki::anchor_from_trusted_cert(root)
        .map_err(|e| format!("the mesh root is unusable: {e}"))?;
    let mut all_intermediates: Vec<CertificateDer<'_>> = presented.to_vec();
    all_intermediates.extend(intermediates.iter().cloned());
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| format!("the {what} is malformed: {e}"))?;
    let key_usage = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    cert.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &all_intermediates,
        UnixTime::now(),
        key_usage,
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::CertExpired { not_after, .. } => {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.as_secs());
            format!(
                "the {what} expired at {}",
                humantime::format_rfc3339_seconds(at)
            )
        }
        e => format!("the {what} does not chain to the mesh root: {e}"),
    })?;
    identity_of(leaf).map_err(|e| e.replacen("the certificate", &format!("the {what}"), 1))
}

/// The SPIFFE identity a certificate names in its one URI SAN.
pub fn identity_of(leaf: &CertificateDer<'_>) -> Result<Identity, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("the certificate is malformed: {e}"))?;
    let uris: Vec<&str> = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .into_iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    let [uri] = uris[..] else {
        return Err(format!(
            "the certificate carries {} URI SANs, not one identity",
            uris.len()
        ));
    };
    Identity::parse(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_other_forms() {
        let id = Identity::parse("spiffe://cluster.local/ns/shop/sa/reviews").unwrap();
        assert_eq!(id, Identity::new("cluster.local", "shop", "reviews"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/reviews");
        for bad in [
            "https://cluster.local/ns/shop/sa/reviews",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns//sa/reviews",
            "spiffe://cluster.local/sa/reviews/ns/shop",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
    }
}
