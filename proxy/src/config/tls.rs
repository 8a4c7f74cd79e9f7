//! TLS settings of a cluster or a listener's filter chain: which
//! certificate to present, which roots a peer must chain to, which peer
//! identities are accepted, and the ALPN offered.

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, UpstreamTlsContext,
    common_tls_context::ValidationContextType, subject_alt_name_matcher::SanType,
};
use envoy_types::pb::envoy::{
    config::core::v3::data_source::Specifier, r#type::matcher::v3::string_matcher::MatchPattern,
};

use super::Problem;

/// SDS name of the workload's certificate and key (served by the agent).
pub const WORKLOAD_SECRET: &str = "default";
/// SDS name of the mesh root.
pub const ROOT_SECRET: &str = "ROOTCA";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// What Citadel issued to this workload (or its root).
    Mesh,
    /// A PEM file.
    File(String),
    /// A Gateway's credential by name (SDS), or its CA (`<name>-cacert`).
    Credential(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tls {
    /// Certificate and key presented; `None` presents none.
    pub certificate: Option<(Source, Source)>,
    /// Roots a peer must chain to. `None`: downstream, no client is
    /// checked; upstream, the server chains to the system's roots.
    pub roots: Option<Source>,
    /// Subject alt names (URIs or DNS names) accepted from the peer;
    /// empty accepts any that chains (a server outside the mesh: by the
    /// SNI name).
    pub peer_identities: Vec<String>,
    pub alpn: Vec<String>,
    pub sni: String,
    /// Downstream: refuse clients without a certificate.
    pub require_client_certificate: bool,
}

impl Tls {
    pub fn upstream(context: &UpstreamTlsContext) -> Result<Self, Problem> {
        let mut tls = Self::common(context.common_tls_context.as_ref())?;
        tls.sni = context.sni.clone();
        Ok(tls)
    }

    pub fn downstream(context: &DownstreamTlsContext) -> Result<Self, Problem> {
        let mut tls = Self::common(context.common_tls_context.as_ref())?;
        tls.require_client_certificate = context
            .require_client_certificate
            .as_ref()
            .is_some_and(|b| b.value);
        Ok(tls)
    }

    fn common(context: Option<&CommonTlsContext>) -> Result<Self, Problem> {
        let default = CommonTlsContext::default();
        let c = context.unwrap_or(&default);
        let certificate = if let Some(sds) = c.tls_certificate_sds_secret_configs.first() {
            let source = sds_secret(sds, WORKLOAD_SECRET);
            Some((source.clone(), source))
        } else if let Some(files) = c.tls_certificates.first() {
            let file = |d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>,
                        what: &str| {
                match d.as_ref().and_then(|d| d.specifier.as_ref()) {
                    Some(Specifier::Filename(f)) => Ok(Source::File(f.clone())),
                    _ => Err(Problem(format!("the {what} must be a file name"))),
                }
            };
            Some((
                file(&files.certificate_chain, "certificate chain")?,
                file(&files.private_key, "private key")?,
            ))
        } else {
            None
        };
        let (roots, sans) = match &c.validation_context_type {
            None => (None, Vec::new()),
            Some(ValidationContextType::ValidationContext(v)) => {
                let roots = match v.trusted_ca.as_ref().and_then(|d| d.specifier.as_ref()) {
                    Some(Specifier::Filename(f)) => Some(Source::File(f.clone())),
                    None => None,
                    Some(_) => return Err(Problem("trusted CA must be a file name".into())),
                };
                (roots, v.match_typed_subject_alt_names.clone())
            }
            Some(ValidationContextType::CombinedValidationContext(combined)) => {
                let roots = combined
                    .validation_context_sds_secret_config
                    .as_ref()
                    .map(|sds| sds_secret(sds, ROOT_SECRET));
                let sans = combined
                    .default_validation_context
                    .as_ref()
                    .map(|v| v.match_typed_subject_alt_names.clone())
                    .unwrap_or_default();
                (roots, sans)
            }
            Some(other) => {
                return Err(Problem(format!(
                    "validation context {other:?} is not supported"
                )));
            }
        };
        let mut peer_identities = Vec::new();
        for san in sans {
            match (
                SanType::try_from(san.san_type),
                san.matcher.and_then(|m| m.match_pattern),
            ) {
                (Ok(SanType::Uri), Some(MatchPattern::Exact(uri))) => peer_identities.push(uri),
                (Ok(SanType::Dns), Some(MatchPattern::Exact(name))) => {
                    peer_identities.push(name.to_ascii_lowercase())
                }
                (t, m) => {
                    return Err(Problem(format!(
                        "subject alt name match {t:?} {m:?} is not supported (exact URIs and DNS names are)"
                    )));
                }
            }
        }
        Ok(Tls {
            certificate,
            roots,
            peer_identities,
            alpn: c.alpn_protocols.clone(),
            sni: String::new(),
            require_client_certificate: false,
        })
    }
}

/// An SDS secret: the mesh's own under its name, else a Gateway's
/// credential.
fn sds_secret(sds: &SdsSecretConfig, mesh: &str) -> Source {
    if sds.name == mesh {
        Source::Mesh
    } else {
        Source::Credential(sds.name.clone())
    }
}
