//! The mesh config: Istio 1.1's defaults overlaid with `--mesh-config FILE`
//! (MeshConfig YAML, watched), served as the one resource
//! `istio-system/meshconfig` of `istio/mesh/v1alpha1/MeshConfig`. A file
//! that stops parsing keeps the last good config served.

use std::{
    collections::BTreeMap,
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
};

use component::CancellationToken;
use mcp_proto::{
    kinds::{self, Body, BodyType},
    mcp::Store,
    mesh::defaults,
    object::versioned_resource,
    pb::istio::mesh::v1alpha1::MeshConfig,
};
use serde_json::Value;

use component::watch::Changes;

pub const RESOURCE_NAME: &str = "istio-system/meshconfig";

/// Reads a mesh config file over the defaults: the file's fields replace
/// the defaults', and `defaultConfig` is overlaid field by field.
pub fn load(path: &Path) -> anyhow::Result<MeshConfig> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let file: Value = if text.trim().is_empty() {
        Value::Object(Default::default())
    } else {
        serde_saphyr::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: invalid YAML: {e}", path.display()))?
    };
    let Value::Object(file) = file else {
        anyhow::bail!(
            "{}: a mesh config is a mapping of MeshConfig fields",
            path.display()
        );
    };
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
        Ok(Body::MeshConfig(config)) => Ok(*config),
        Ok(_) => unreachable!("MeshConfig parses to a MeshConfig"),
        Err(e) => anyhow::bail!("{}: {}: {}", path.display(), e.path(), e.inner()),
    }
}

fn publish(store: &Store, config: MeshConfig) {
    let resource = versioned_resource(
        RESOURCE_NAME.into(),
        &Body::MeshConfig(Box::new(config)),
        &BTreeMap::new(),
        &BTreeMap::new(),
    );
    if let Err(e) = store.replace(kinds::MESH_CONFIG, vec![resource]) {
        tracing::error!(error = %e, "cannot publish the mesh config");
    }
}

/// Publishes the mesh config (the defaults when `path` is `None`) and
/// returns the future that republishes it on every change of the file until
/// `shutdown`. A file that does not load at start is an error; later, the
/// last good config stays served and the error is logged.
pub fn start(
    path: Option<PathBuf>,
    store: Arc<Store>,
    shutdown: CancellationToken,
) -> anyhow::Result<impl Future<Output = ()> + Send> {
    let Some(path) = path else {
        publish(&store, defaults());
        return Ok(follow(None, store, shutdown));
    };
    let changes = Changes::file(&path)?;
    publish(&store, load(&path)?);
    Ok(follow(Some((path, changes)), store, shutdown))
}

async fn follow(
    watched: Option<(PathBuf, Changes)>,
    store: Arc<Store>,
    shutdown: CancellationToken,
) {
    let Some((path, mut changes)) = watched else {
        return shutdown.cancelled().await;
    };
    loop {
        tokio::select! {
            changed = changes.next() => {
                if changed.is_none() {
                    return;
                }
                match load(&path) {
                    Ok(config) => publish(&store, config),
                    Err(e) => tracing::error!("mesh config not updated, the last good one stays: {e:#}"),
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_overlays_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, "disablePolicyChecks: false\nconnectTimeout: 5s\ndefaultConfig:\n  discoveryAddress: pilot:15011\n").unwrap();
        let config = load(&path).unwrap();
        assert!(!config.disable_policy_checks);
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
    fn errors_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, "connectTimeout: soon\n").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("mesh.yaml") && e.contains("connectTimeout"),
            "{e}"
        );
        std::fs::write(&path, "- a list\n").unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("mapping"));
    }
}
