//! The mesh config: what Istio 1.1 uses for every field a mesh config
//! leaves out, and a mesh config file read over those defaults. Galley
//! serves it; Pilot reads its own file, or the defaults, when its source
//! serves no mesh config (Istio 1.1's Galley does not).

use std::path::Path;

use serde_json::Value;

use crate::{
    kinds::{Body, BodyType},
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

/// Mesh config fields that this mesh's components do not read, and what
/// does the job instead. A file that sets one is served with a warning.
const IGNORED: &[(&str, &str)] = &[
    (
        "disablePolicyChecks",
        "proxies check with Mixer when started with --mixer-policy, whatever this says",
    ),
    (
        "policyCheckFailOpen",
        "proxies fail open or closed by their --mixer-fail-open flag",
    ),
    (
        "enableTracing",
        "proxies trace when OTEL_EXPORTER_OTLP_ENDPOINT is set, at --trace-sampling",
    ),
    (
        "mixerCheckServer",
        "proxies find the policy Mixer by their --mixer-policy flag",
    ),
    (
        "mixerReportServer",
        "proxies find the telemetry Mixer by their --mixer-telemetry flag",
    ),
];

/// A mesh config file, read.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: MeshConfig,
    /// `field: why`, for each field set that nothing honours.
    pub warnings: Vec<String>,
}

/// Reads a mesh config file over the defaults: the file's fields replace
/// the defaults', and `defaultConfig` is overlaid field by field. Errors
/// name the file and the field.
pub fn load(path: &Path) -> Result<Loaded, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: Value = if text.trim().is_empty() {
        Value::Object(Default::default())
    } else {
        serde_saphyr::from_str(&text)
            .map_err(|e| format!("{}: invalid YAML: {e}", path.display()))?
    };
    let Value::Object(file) = file else {
        return Err(format!(
            "{}: a mesh config is a mapping of MeshConfig fields",
            path.display()
        ));
    };
    let warnings = IGNORED
        .iter()
        .filter(|(field, _)| file.contains_key(*field))
        .map(|(field, why)| format!("{field}: not honoured: {why}"))
        .collect();
    let mut merged = Body::MeshConfig(Box::new(defaults())).to_json();
    for (key, value) in file {
        match (merged.get_mut(&key), value) {
            (Some(Value::Object(base)), Value::Object(overlay)) if key == "defaultConfig" => {
                base.extend(overlay)
            }
            (_, value) => {
                merged[key] = value;
            }
        }
    }
    match BodyType::MeshConfig.from_json(merged) {
        Ok(Body::MeshConfig(config)) => Ok(Loaded {
            config: *config,
            warnings,
        }),
        Ok(_) => unreachable!("MeshConfig parses to a MeshConfig"),
        Err(e) => Err(format!("{}: {}: {}", path.display(), e.path(), e.inner())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_overlays_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(
            &path,
            "connectTimeout: 5s\ndefaultConfig:\n  discoveryAddress: pilot:15011\n",
        )
        .unwrap();
        let Loaded { config, warnings } = load(&path).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(config.connect_timeout.unwrap().seconds, 5);
        let proxy = config.default_config.unwrap();
        assert_eq!(proxy.discovery_address, "pilot:15011");
        assert_eq!(
            proxy.proxy_admin_port, 15000,
            "unset proxy fields keep their defaults"
        );
        assert_eq!(config.proxy_listen_port, 15001);
    }

    #[test]
    fn fields_nothing_honours_are_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(
            &path,
            "disablePolicyChecks: false\nmixerCheckServer: policy:9091\n",
        )
        .unwrap();
        let Loaded { config, warnings } = load(&path).unwrap();
        assert!(!config.disable_policy_checks, "still read and served");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].starts_with("disablePolicyChecks: not honoured"));
        assert!(warnings[1].contains("--mixer-policy"));
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, "connectTimeout: soon\n").unwrap();
        let e = load(&path).unwrap_err();
        assert!(
            e.contains("mesh.yaml") && e.contains("connectTimeout"),
            "{e}"
        );
        std::fs::write(&path, "- a list\n").unwrap();
        assert!(load(&path).unwrap_err().contains("mapping"));
    }
}
