//! The mesh config's defaults: what Istio 1.1 uses for every field a mesh
//! config leaves out. Galley overlays its file on them; Pilot uses them when
//! its source serves no mesh config (Istio 1.1's Galley does not).

use crate::{
    pb::istio::mesh::v1alpha1::{
        MeshConfig, ProxyConfig,
        mesh_config::{AccessLogEncoding, OutboundTrafficPolicy, outbound_traffic_policy},
    },
    wkt::Duration,
};

fn seconds(seconds: i64) -> Option<Duration> {
    Some(Duration { seconds, nanos: 0 })
}

/// The values Istio 1.1 uses for what a mesh config file leaves out.
pub fn defaults() -> MeshConfig {
    MeshConfig {
        disable_policy_checks: true,
        root_namespace: "istio-system".into(),
        proxy_listen_port: 15001,
        connect_timeout: seconds(1),
        ingress_service: "istio-ingressgateway".into(),
        enable_tracing: true,
        access_log_file: "/dev/stdout".into(),
        access_log_encoding: AccessLogEncoding::Text as i32,
        default_config: Some(ProxyConfig {
            config_path: "/etc/istio/proxy".into(),
            binary_path: "/usr/local/bin/envoy".into(),
            service_cluster: "istio-proxy".into(),
            drain_duration: seconds(45),
            parent_shutdown_duration: seconds(60),
            discovery_address: "istio-pilot:15010".into(),
            connect_timeout: seconds(1),
            proxy_admin_port: 15000,
            stat_name_length: 189,
            ..ProxyConfig::default()
        }),
        default_service_export_to: vec!["*".into()],
        default_virtual_service_export_to: vec!["*".into()],
        default_destination_rule_export_to: vec!["*".into()],
        outbound_traffic_policy: Some(OutboundTrafficPolicy {
            mode: outbound_traffic_policy::Mode::AllowAny as i32,
        }),
        dns_refresh_rate: seconds(5),
        ..MeshConfig::default()
    }
}
