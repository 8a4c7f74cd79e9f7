//! The mesh config: Istio 1.1's defaults overlaid with `--mesh-config FILE`
//! (MeshConfig YAML, watched), served as the one resource
//! `istio-system/meshconfig` of `istio/mesh/v1alpha1/MeshConfig`. A file
//! that stops parsing keeps the last good config served. Fields that no
//! component honours are warned about on `/debug/config`.

use std::{
    collections::BTreeMap,
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
};

use component::CancellationToken;
use mcp::Store;
use mesh_api::{
    kinds::{self, Body},
    mesh::{Loaded, defaults, load},
    object::versioned_resource,
    pb::istio::mesh::v1alpha1::MeshConfig,
};

use crate::status::ConfigStatus;

use component::watch::Changes;

pub const RESOURCE_NAME: &str = "istio-system/meshconfig";

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
    status: ConfigStatus,
    shutdown: CancellationToken,
) -> anyhow::Result<impl Future<Output = ()> + Send> {
    let Some(path) = path else {
        publish(&store, defaults());
        return Ok(follow(None, store, status, shutdown));
    };
    let changes = Changes::file(&path)?;
    let loaded = load(&path).map_err(anyhow::Error::msg)?;
    take(&path, &store, &status, loaded);
    Ok(follow(Some((path, changes)), store, status, shutdown))
}

fn take(path: &Path, store: &Store, status: &ConfigStatus, loaded: Loaded) {
    let Loaded { config, warnings } = loaded;
    let warnings: Vec<String> = warnings
        .iter()
        .map(|w| format!("{}: warning: {w}", path.display()))
        .collect();
    for w in &warnings {
        tracing::warn!("{w}");
    }
    status.record_mesh_config(warnings);
    publish(store, config);
}

async fn follow(
    watched: Option<(PathBuf, Changes)>,
    store: Arc<Store>,
    status: ConfigStatus,
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
                    Ok(loaded) => take(&path, &store, &status, loaded),
                    Err(e) => tracing::error!("mesh config not updated, the last good one stays: {e}"),
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}
