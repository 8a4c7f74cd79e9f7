//! The keys of the JWT issuers that authentication policies name by
//! `jwksUri`. Pilot fetches them (over HTTPS, trusting the system's roots;
//! `SSL_CERT_FILE` names others), keeps them, fetches them again every 20
//! minutes as Istio 1.1's Pilot does (every 5 s while a fetch fails), and
//! sends them to proxies inline, so that no proxy reaches out to an
//! identity provider.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use component::CancellationToken;
use tokio::{sync::watch, time::Instant};

/// How long fetched keys serve before they are fetched again.
const REFRESH: Duration = Duration::from_secs(20 * 60);
/// How soon a failed fetch is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// The `jwksUri`s a model's policies name.
pub fn uris(config: &crate::model::Config) -> BTreeSet<String> {
    config
        .policies
        .iter()
        .map(|p| &p.spec)
        .chain(config.mesh_policy.as_ref())
        .flat_map(|p| &p.origins)
        .filter_map(|o| o.jwt.as_ref())
        .map(|j| j.jwks_uri.clone())
        .filter(|u| !u.is_empty())
        .collect()
}

/// Keeps the keys of every URI `wanted` names, published on `keys`, until
/// `shutdown`.
pub async fn keep(
    mut wanted: watch::Receiver<BTreeSet<String>>,
    keys: watch::Sender<Arc<BTreeMap<String, String>>>,
    shutdown: CancellationToken,
) {
    let client = match client() {
        Ok(c) => c,
        Err(e) => return tracing::error!("JWKS fetching disabled: {e}"),
    };
    // When each URI is due to be fetched.
    let mut due: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let now = Instant::now();
        let uris = wanted.borrow_and_update().clone();
        due.retain(|u, _| uris.contains(u));
        for uri in &uris {
            if due.get(uri).is_some_and(|at| *at > now) {
                continue;
            }
            match fetch(&client, uri).await {
                Ok(jwks) => {
                    tracing::info!(%uri, "JWKS fetched");
                    keys.send_if_modified(|current| {
                        let changed = current.get(uri) != Some(&jwks);
                        if changed {
                            Arc::make_mut(current).insert(uri.clone(), jwks);
                        }
                        changed
                    });
                    due.insert(uri.clone(), now + REFRESH);
                }
                Err(e) => {
                    tracing::warn!(%uri, "JWKS not fetched: {e}");
                    due.insert(uri.clone(), now + RETRY);
                }
            }
        }
        let next = due.values().min().copied();
        let wait = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = wanted.changed() => if changed.is_err() { return },
            _ = wait => {}
        }
    }
}

fn client() -> anyhow::Result<reqwest::Client> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// The JWKS at `uri`, checked to be one.
async fn fetch(client: &reqwest::Client, uri: &str) -> anyhow::Result<String> {
    let response = client.get(uri).send().await?.error_for_status()?;
    let text = response.text().await?;
    let parsed: serde_json::Value = serde_json::from_str(&text)?;
    anyhow::ensure!(parsed["keys"].is_array(), "not a JWKS (no \"keys\")");
    Ok(text)
}
