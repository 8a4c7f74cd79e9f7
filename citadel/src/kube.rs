//! Kubernetes mode. Callers authenticate with their service account token,
//! checked by a TokenReview. Every ServiceAccount gets a Secret
//! `istio.<name>` of type `istio.io/key-and-cert` holding a key and a
//! certificate for its identity, rotated once a share of its lifetime has
//! passed (or when the root changed) and deleted with the account. The
//! root is published in the ConfigMap `istio-security`.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenReview, TokenReviewSpec},
        core::v1::{ConfigMap, Secret, ServiceAccount},
    },
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, PostParams},
    runtime::watcher::{self, Event},
};
use prometheus_client::{
    encoding::EncodeLabelSet, metrics::counter::Counter, metrics::family::Family,
};
use rcgen::{KeyPair, SanType};
use tonic::Status;

use crate::{ca::Ca, identity::Identity};

pub const SECRET_TYPE: &str = "istio.io/key-and-cert";
pub const ROOT_CONFIG_MAP: &str = "istio-security";
const ROOT_CONFIG_MAP_KEY: &str = "caTLSRootCert";
const SA_ANNOTATION: &str = "istio.io/service-account.name";

/// Checks bearer tokens with the API server.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    trust_domain: String,
}

impl TokenReviewer {
    pub fn new(client: Client, trust_domain: &str) -> Self {
        Self {
            api: Api::all(client),
            trust_domain: trust_domain.into(),
        }
    }

    /// The identity of a service account token.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviewed = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Status::unavailable(format!("token review failed: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Status::unauthenticated(format!(
                "the token was not accepted: {}",
                status.error.as_deref().unwrap_or("no reason given")
            )));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        match user
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
        {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity::new(&self.trust_domain, ns, sa))
            }
            _ => Err(Status::unauthenticated(format!(
                "{user:?} is not a service account"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SecretOptions {
    pub ttl: Duration,
    /// Rotate once less than this share of a certificate's lifetime is
    /// left.
    pub grace_ratio: f64,
    /// How often every secret is checked for rotation.
    pub check_interval: Duration,
    pub dns_names: Vec<DnsName>,
}

/// A DNS name for one ServiceAccount's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsName {
    pub namespace: String,
    pub account: String,
    pub name: String,
}

/// Parses `<namespace>/<account>=<name>`.
pub fn parse_dns_name(text: &str) -> Result<DnsName, String> {
    let parsed = text.split_once('=').and_then(|(who, name)| {
        let (namespace, account) = who.split_once('/')?;
        let all = [namespace, account, name];
        all.iter().all(|s| !s.is_empty()).then(|| DnsName {
            namespace: namespace.into(),
            account: account.into(),
            name: name.into(),
        })
    });
    parsed.ok_or_else(|| format!("{text:?} is not <namespace>/<account>=<dns name>"))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Action {
    action: &'static str,
}

/// Keeps a key-and-cert Secret in step with every ServiceAccount.
pub struct SecretController {
    client: Client,
    ca: Arc<Ca>,
    options: SecretOptions,
    written: Family<Action, Counter>,
}

impl SecretController {
    pub fn new(
        client: Client,
        ca: Arc<Ca>,
        options: SecretOptions,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let written = Family::<Action, Counter>::default();
        registry.register(
            "secrets_written",
            "Key-and-cert secrets created, rotated and deleted",
            written.clone(),
        );
        Self {
            client,
            ca,
            options,
            written,
        }
    }

    /// Publishes the root in `namespace`, then follows ServiceAccounts
    /// until `shutdown`.
    pub async fn run(
        self,
        namespace: &str,
        shutdown: component::CancellationToken,
    ) -> anyhow::Result<()> {
        self.publish_root(namespace).await?;
        let accounts: Api<ServiceAccount> = Api::all(self.client.clone());
        let mut events = watcher::watcher(accounts, watcher::Config::default()).boxed();
        let mut known: BTreeSet<(String, String)> = BTreeSet::new();
        let mut check = tokio::time::interval(self.options.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(Event::Apply(sa) | Event::InitApply(sa))) => {
                        let key = (sa.metadata.namespace.unwrap_or_default(), sa.metadata.name.unwrap_or_default());
                        self.ensure(&key.0, &key.1).await;
                        known.insert(key);
                    }
                    Some(Ok(Event::Delete(sa))) => {
                        let key = (sa.metadata.namespace.unwrap_or_default(), sa.metadata.name.unwrap_or_default());
                        self.delete(&key.0, &key.1).await;
                        known.remove(&key);
                    }
                    Some(Ok(Event::Init | Event::InitDone)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "watching service accounts failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    None => return Ok(()),
                },
                _ = check.tick() => {
                    for (ns, sa) in &known {
                        self.ensure(ns, sa).await;
                    }
                }
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    async fn publish_root(&self, namespace: &str) -> anyhow::Result<()> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let config_map = ConfigMap {
            metadata: ObjectMeta {
                name: Some(ROOT_CONFIG_MAP.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                ROOT_CONFIG_MAP_KEY.to_string(),
                self.ca.root_pem().to_string(),
            )])),
            ..Default::default()
        };
        let result = match api.create(&PostParams::default(), &config_map).await {
            Err(kube::Error::Api(e)) if e.code == 409 => {
                api.replace(ROOT_CONFIG_MAP, &PostParams::default(), &config_map)
                    .await
            }
            other => other,
        };
        result.map_err(|e| {
            anyhow::anyhow!("publishing the root in ConfigMap {namespace}/{ROOT_CONFIG_MAP}: {e}")
        })?;
        Ok(())
    }

    /// Creates the account's secret, or rotates it when due; failures are
    /// logged and retried at the next check.
    async fn ensure(&self, namespace: &str, account: &str) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let name = secret_name(account);
        let (action, result) = match api.get_opt(&name).await {
            Ok(None) => ("create", self.write(&api, namespace, account, false).await),
            Ok(Some(secret)) if self.due(&secret) => {
                ("rotate", self.write(&api, namespace, account, true).await)
            }
            Ok(Some(_)) => return,
            Err(e) => ("read", Err(e.to_string())),
        };
        match result {
            Ok(()) => {
                self.written.get_or_create(&Action { action }).inc();
                tracing::info!(%namespace, %account, action, "key and certificate secret written");
            }
            Err(e) => {
                tracing::warn!(%namespace, %account, action, error = %e, "key and certificate secret not written")
            }
        }
    }

    /// Whether a secret needs a new certificate: not ours, unreadable,
    /// under another root, or with less than the grace share left.
    fn due(&self, secret: &Secret) -> bool {
        let data = secret.data.clone().unwrap_or_default();
        let text = |key: &str| {
            data.get(key)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        };
        if secret.type_.as_deref() != Some(SECRET_TYPE)
            || text("root-cert.pem").as_deref() != Some(self.ca.root_pem())
        {
            return true;
        }
        let Some(validity) = text("cert-chain.pem").and_then(|pem| validity(&pem)) else {
            return true;
        };
        let (not_before, not_after) = validity;
        let lifetime = not_after.duration_since(not_before).unwrap_or_default();
        let left = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        left.as_secs_f64() < lifetime.as_secs_f64() * self.options.grace_ratio
    }

    async fn write(
        &self,
        api: &Api<Secret>,
        namespace: &str,
        account: &str,
        replace: bool,
    ) -> Result<(), String> {
        let identity = Identity::new(self.ca.trust_domain(), namespace, account);
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| e.to_string())?;
        let mut sans = vec![SanType::URI(uri)];
        for dns in &self.options.dns_names {
            if dns.namespace == namespace && dns.account == account {
                let name = dns.name.clone().try_into();
                sans.push(SanType::DnsName(
                    name.map_err(|e: rcgen::Error| e.to_string())?,
                ));
            }
        }
        let chain = self
            .ca
            .issue(&key, sans, self.options.ttl)
            .map_err(|e| e.to_string())?;
        let bytes = |s: String| ByteString(s.into_bytes());
        let name = secret_name(account);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.into()),
                annotations: Some(BTreeMap::from([(
                    SA_ANNOTATION.to_string(),
                    account.to_string(),
                )])),
                ..Default::default()
            },
            type_: Some(SECRET_TYPE.into()),
            data: Some(BTreeMap::from([
                ("key.pem".to_string(), bytes(key.serialize_pem())),
                (
                    "cert-chain.pem".to_string(),
                    bytes(chain[..chain.len() - 1].concat()),
                ),
                (
                    "root-cert.pem".to_string(),
                    bytes(self.ca.root_pem().to_string()),
                ),
            ])),
            ..Default::default()
        };
        let params = PostParams::default();
        let result = if replace {
            api.replace(&name, &params, &secret).await
        } else {
            api.create(&params, &secret).await
        };
        result.map(|_| ()).map_err(|e| e.to_string())
    }

    async fn delete(&self, namespace: &str, account: &str) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        match api
            .delete(&secret_name(account), &DeleteParams::default())
            .await
        {
            Ok(_) => {
                self.written
                    .get_or_create(&Action { action: "delete" })
                    .inc();
                tracing::info!(%namespace, %account, "key and certificate secret deleted");
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                tracing::warn!(%namespace, %account, error = %e, "key and certificate secret not deleted")
            }
        }
    }
}

pub fn secret_name(account: &str) -> String {
    format!("istio.{account}")
}

/// The validity of the first certificate of a PEM chain.
fn validity(pem: &str) -> Option<(SystemTime, SystemTime)> {
    let block = pem::parse_many(pem).ok()?.into_iter().next()?;
    let (_, cert) = x509_parser::parse_x509_certificate(block.contents()).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Some((
        at(cert.validity().not_before),
        at(cert.validity().not_after),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_parse_and_bad_ones_say_the_form() {
        let dns = parse_dns_name(
            "istio-system/istio-galley-service-account=istio-galley.istio-system.svc",
        )
        .unwrap();
        assert_eq!(
            (
                dns.namespace.as_str(),
                dns.account.as_str(),
                dns.name.as_str()
            ),
            (
                "istio-system",
                "istio-galley-service-account",
                "istio-galley.istio-system.svc"
            )
        );
        for bad in ["galley=x", "ns/=x", "ns/sa=", "ns/sa"] {
            let e = parse_dns_name(bad).unwrap_err();
            assert!(
                e.ends_with("is not <namespace>/<account>=<dns name>"),
                "{e}"
            );
        }
    }
}
