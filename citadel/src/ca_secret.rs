//! The CA kept in a Kubernetes Secret (Istio 1.1's `istio-ca-secret`), so
//! that a Citadel pod that restarts, or moves, signs with the same root:
//! its `--ca-dir` is scratch space in a pod, and a root generated anew
//! would leave every workload certificate untrusted. An operator who
//! brings their own CA creates the Secret before Citadel first starts.

use std::{collections::BTreeMap, path::Path};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

use crate::ca::{CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};

const FILES: [&str; 4] = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT];

/// Writes the Secret's CA files into `dir` unless `dir` holds a CA
/// already (plugged-in files win); whether it did.
pub async fn restore(
    client: &Client,
    namespace: &str,
    name: &str,
    dir: &Path,
) -> anyhow::Result<bool> {
    if FILES.iter().any(|f| dir.join(f).exists()) {
        return Ok(false);
    }
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let Some(secret) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let data = secret.data.unwrap_or_default();
    std::fs::create_dir_all(dir)?;
    for file in FILES {
        let bytes = data
            .get(file)
            .ok_or_else(|| anyhow::anyhow!("secret {namespace}/{name} has no {file}"))?;
        std::fs::write(dir.join(file), &bytes.0)
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(file).display()))?;
    }
    tracing::info!(secret = %format!("{namespace}/{name}"), "CA restored from its secret");
    Ok(true)
}

/// Saves the CA files of `dir` as the Secret. One that exists already
/// (another Citadel saved first) is left as it is: the next start restores it.
pub async fn save(client: &Client, namespace: &str, name: &str, dir: &Path) -> anyhow::Result<()> {
    let mut data = BTreeMap::new();
    for file in FILES {
        let bytes = std::fs::read(dir.join(file))
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(file).display()))?;
        data.insert(file.to_string(), ByteString(bytes));
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        type_: Some("istio.io/ca-root".into()),
        data: Some(data),
        ..Default::default()
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), "CA saved to its secret");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::warn!(secret = %format!("{namespace}/{name}"), "a CA secret exists already; it is used from the next start");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
