//! TLS settings shared by clusters (upstream) and listeners (downstream):
//! the workload's own certificate and the mesh root by SDS name, which the
//! proxy's agent serves from what Citadel issued, or certificate files that
//! config names.

use envoy_types::pb::envoy::{
    config::core::v3::{
        ApiConfigSource, ApiVersion, ConfigSource, DataSource, GrpcService, TransportSocket,
        api_config_source::ApiType, config_source, data_source, grpc_service,
        transport_socket::ConfigType,
    },
    extensions::transport_sockets::tls::v3::{
        CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
        SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext, common_tls_context,
        subject_alt_name_matcher::SanType,
    },
    r#type::matcher::v3::{StringMatcher, string_matcher},
};

use super::any;

/// SDS name of the workload's certificate and key.
pub const WORKLOAD_SECRET: &str = "default";
/// SDS name of the mesh's root certificate.
pub const ROOT_SECRET: &str = "ROOTCA";
/// The bootstrap cluster that reaches the proxy's agent for SDS.
pub const SDS_CLUSTER: &str = "sds-grpc";
/// ALPN a sidecar offers on mesh mTLS, so that a PERMISSIVE port can tell
/// it from an application's own TLS.
pub const MESH_ALPN: &str = "istio";

const TLS_SOCKET: &str = "envoy.transport_sockets.tls";

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ConfigSource {
            resource_api_version: ApiVersion::V3 as i32,
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    api_type: ApiType::Grpc as i32,
                    transport_api_version: ApiVersion::V3 as i32,
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                            grpc_service::EnvoyGrpc {
                                cluster_name: SDS_CLUSTER.to_string(),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
    }
}

fn file(path: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::Filename(path.to_string())),
        ..Default::default()
    })
}

/// Peer identities accepted: SANs equal to one of `names`, URIs (SPIFFE
/// identities) for those with a scheme, DNS names for the rest.
fn san_matchers(names: &[String]) -> Vec<SubjectAltNameMatcher> {
    names
        .iter()
        .map(|n| SubjectAltNameMatcher {
            san_type: if n.contains("://") {
                SanType::Uri
            } else {
                SanType::Dns
            } as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact(n.clone())),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

/// The mesh's own mTLS: Citadel's certificate and root, by SDS.
pub fn mesh_context(alpn: &[&str], peer_identities: &[String]) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(WORKLOAD_SECRET)],
        validation_context_type: Some(
            common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: san_matchers(peer_identities),
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds(ROOT_SECRET)),
                    ..Default::default()
                },
            ),
        ),
        alpn_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// TLS from files: an optional certificate and key, and an optional CA
/// bundle that peers must chain to (with their accepted identities).
pub fn file_context(
    cert_and_key: Option<(&str, &str)>,
    ca: &str,
    peer_identities: &[String],
    alpn: &[&str],
) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificates: cert_and_key
            .map(|(cert, key)| TlsCertificate {
                certificate_chain: file(cert),
                private_key: file(key),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        validation_context_type: (!ca.is_empty()).then(|| {
            common_tls_context::ValidationContextType::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: file(ca),
                    match_typed_subject_alt_names: san_matchers(peer_identities),
                    ..Default::default()
                },
            )
        }),
        alpn_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A certificate by SDS name (a gateway's `credentialName`), and for
/// MUTUAL the CA clients must chain to, by SDS as `<name>-cacert` (Istio
/// 1.1's name for it), with their accepted identities.
pub fn sds_certificate_context(
    name: &str,
    mutual: bool,
    peer_identities: &[String],
    alpn: &[&str],
) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(name)],
        validation_context_type: mutual.then(|| {
            common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: san_matchers(peer_identities),
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds(&format!("{name}-cacert"))),
                    ..Default::default()
                },
            )
        }),
        alpn_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn upstream(context: CommonTlsContext, sni: &str) -> TransportSocket {
    socket(any(&UpstreamTlsContext {
        common_tls_context: Some(context),
        sni: sni.to_string(),
        ..Default::default()
    }))
}

pub fn downstream(context: CommonTlsContext, require_client_certificate: bool) -> TransportSocket {
    socket(any(&DownstreamTlsContext {
        common_tls_context: Some(context),
        require_client_certificate: Some(envoy_types::pb::google::protobuf::BoolValue {
            value: require_client_certificate,
        }),
        ..Default::default()
    }))
}

fn socket(config: envoy_types::pb::google::protobuf::Any) -> TransportSocket {
    TransportSocket {
        name: TLS_SOCKET.to_string(),
        config_type: Some(ConfigType::TypedConfig(config)),
    }
}
