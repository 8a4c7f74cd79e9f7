//! The certificates Gateways name by `credentialName`, which Pilot points
//! the gateway at by SDS. The gateway's own agent holds them, not Galley:
//! only the gateway's service account may then read private keys (the
//! Secrets of its own namespace), and no key travels over MCP to every
//! component. Istio 1.1's SDS ingress gateway made the same choice.
//!
//! They come from a directory laid out as Kubernetes mounts Secrets
//! (`--credentials-dir`), and, in Kubernetes, from the Secrets of the
//! gateway's namespace, watched (`--credentials-from-secrets`). A
//! credential holds `tls.crt` and `tls.key` (or Istio's `cert` and `key`),
//! and for MUTUAL a CA: `ca.crt` or `cacert`, in the credential itself or
//! in a credential named `<name>-cacert`, as Istio 1.1 reads them.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::RwLock,
};

use clap::Args;
use component::CancellationToken;

#[derive(Debug, Clone, Default, Args)]
pub struct SecretsArgs {
    /// A directory of credentials, one directory each, named as the
    /// Gateways' `credentialName`s.
    #[arg(long)]
    pub credentials_dir: Option<PathBuf>,
    /// Watch the Secrets of the proxy's namespace for credentials.
    #[arg(long)]
    pub credentials_from_secrets: bool,
    /// Kubeconfig for `--credentials-from-secrets` (in-cluster config when
    /// absent).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

/// One credential's parts, as PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Credential {
    pub certificate: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
    pub ca: Option<Vec<u8>>,
}

impl Credential {
    /// From a Secret's (or a mounted directory's) entries by name.
    fn from_entries(mut entries: BTreeMap<String, Vec<u8>>) -> Self {
        let mut take = |names: [&str; 2]| names.iter().find_map(|n| entries.remove(*n));
        Self {
            certificate: take(["tls.crt", "cert"]),
            key: take(["tls.key", "key"]),
            ca: take(["ca.crt", "cacert"]),
        }
    }
}

/// The credentials the proxy can serve.
#[derive(Debug, Default)]
pub struct Secrets {
    dir: Option<PathBuf>,
    /// From watched Secrets, by name.
    watched: RwLock<HashMap<String, Credential>>,
}

impl Secrets {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            watched: RwLock::default(),
        }
    }

    /// The credential `name`: a watched Secret, else the directory's.
    pub fn get(&self, name: &str) -> Option<Credential> {
        let watched = self.watched.read().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = watched.get(name) {
            return Some(c.clone());
        }
        drop(watched);
        let dir = self.dir.as_ref()?.join(name);
        let entries = std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                // A mount's own bookkeeping (`..data`) is not an entry.
                if name.starts_with('.') {
                    return None;
                }
                Some((name, std::fs::read(e.path()).ok()?))
            })
            .collect();
        Some(Credential::from_entries(entries))
    }

    /// The certificate chain and key of credential `name`.
    pub fn certificate(&self, name: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
        let c = self
            .get(name)
            .ok_or_else(|| format!("no credential {name:?}"))?;
        match (c.certificate, c.key) {
            (Some(cert), Some(key)) => Ok((cert, key)),
            _ => Err(format!("credential {name:?} has no certificate and key")),
        }
    }

    /// The CA of `name` (`<credential>-cacert`): a credential of that
    /// name, else the one it is named for.
    pub fn ca(&self, name: &str) -> Result<Vec<u8>, String> {
        let own = self.get(name).and_then(|c| c.ca);
        let base = name.strip_suffix("-cacert");
        own.or_else(|| self.get(base?)?.ca)
            .ok_or_else(|| format!("no CA in credential {name:?}"))
    }

    fn put(&self, name: String, credential: Option<Credential>) {
        let mut watched = self.watched.write().unwrap_or_else(|e| e.into_inner());
        match credential {
            Some(c) => watched.insert(name, c),
            None => watched.remove(&name),
        };
    }

    /// Keeps the Secrets of `namespace` until `shutdown`.
    pub async fn watch(
        self: std::sync::Arc<Self>,
        client: kube::Client,
        namespace: String,
        shutdown: CancellationToken,
    ) {
        use futures::StreamExt;
        use k8s_openapi::api::core::v1::Secret;
        use kube::runtime::watcher::{self, Event};

        let api: kube::Api<Secret> = kube::Api::namespaced(client, &namespace);
        let mut events = watcher::watcher(api, watcher::Config::default()).boxed();
        let credential = |s: &Secret| {
            let entries = s
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect();
            Credential::from_entries(entries)
        };
        let mut listed = Vec::new();
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = events.next() => match event {
                    Some(event) => event,
                    None => return,
                },
            };
            match event {
                Ok(Event::Apply(s)) | Ok(Event::InitApply(s)) => {
                    let name = s.metadata.name.clone().unwrap_or_default();
                    tracing::info!(secret = %name, %namespace, "credential updated");
                    listed.push(name.clone());
                    self.put(name, Some(credential(&s)));
                }
                Ok(Event::Delete(s)) => {
                    let name = s.metadata.name.clone().unwrap_or_default();
                    tracing::info!(secret = %name, %namespace, "credential removed");
                    self.put(name, None);
                }
                Ok(Event::Init) => listed.clear(),
                // A relist: what it did not name is gone.
                Ok(Event::InitDone) => {
                    let mut watched = self.watched.write().unwrap_or_else(|e| e.into_inner());
                    watched.retain(|name, _| listed.contains(name));
                }
                Err(e) => tracing::warn!(%namespace, "watching Secrets: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, name: &str, entries: &[(&str, &str)]) {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in entries {
            std::fs::write(dir.join(file), text).unwrap();
        }
    }

    #[test]
    fn credentials_are_read_as_kubernetes_mounts_secrets_in_either_naming() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "tls",
            &[("tls.crt", "C"), ("tls.key", "K"), ("..data", "x")],
        );
        write(
            dir.path(),
            "istio",
            &[("cert", "C2"), ("key", "K2"), ("cacert", "A2")],
        );
        write(dir.path(), "tls-cacert", &[("ca.crt", "A3")]);
        write(dir.path(), "broken", &[("tls.crt", "C")]);
        let secrets = Secrets::new(Some(dir.path().to_path_buf()));
        assert_eq!(
            secrets.certificate("tls").unwrap(),
            (b"C".to_vec(), b"K".to_vec())
        );
        assert_eq!(
            secrets.certificate("istio").unwrap(),
            (b"C2".to_vec(), b"K2".to_vec())
        );
        // The CA: a credential of its own, or the one it is named for.
        assert_eq!(secrets.ca("tls-cacert").unwrap(), b"A3");
        assert_eq!(secrets.ca("istio-cacert").unwrap(), b"A2");
        let why = secrets.certificate("broken").unwrap_err();
        assert!(why.contains("no certificate and key"), "{why}");
        assert!(
            secrets
                .certificate("missing")
                .unwrap_err()
                .contains("no credential")
        );
    }

    #[test]
    fn a_watched_secret_comes_before_the_directory_and_goes_when_deleted() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "shared",
            &[("tls.crt", "from-dir"), ("tls.key", "K")],
        );
        let secrets = Secrets::new(Some(dir.path().to_path_buf()));
        let watched = Credential {
            certificate: Some(b"from-secret".to_vec()),
            key: Some(b"K".to_vec()),
            ca: None,
        };
        secrets.put("shared".into(), Some(watched));
        assert_eq!(secrets.certificate("shared").unwrap().0, b"from-secret");
        secrets.put("shared".into(), None);
        assert_eq!(secrets.certificate("shared").unwrap().0, b"from-dir");
    }
}
