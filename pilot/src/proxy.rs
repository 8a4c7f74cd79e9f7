//! Who a proxy is, from the `Node` it sends on its first xDS request: the
//! node id in Istio's form `type~ip~pod.namespace~namespace.svc.domain` and
//! the node metadata, which carries what the id cannot (labels, the
//! namespace, the interception mode, the service account).

use std::{collections::BTreeMap, net::IpAddr};

use envoy_types::pb::{
    envoy::config::core::v3::Node,
    google::protobuf::{Struct, Value, value::Kind},
};

/// What kind of proxy asks: a workload's sidecar or a gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProxyKind {
    Sidecar,
    /// A gateway (Istio's `router`; `ingress` is read as the same).
    Router,
}

/// How traffic reaches the proxy: redirected by iptables, so listeners are
/// not bound and the original destination picks one, or not intercepted,
/// so every listener binds its own address (Istio's `INTERCEPTION_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Interception {
    Redirect,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Proxy {
    pub kind: ProxyKind,
    pub id: String,
    pub ip: IpAddr,
    pub namespace: String,
    /// The DNS domain, `<namespace>.svc.<trust domain>`.
    pub domain: String,
    /// The workload's labels, from metadata `LABELS` (a struct or a JSON
    /// object string); empty when the proxy sends none.
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub interception: Interception,
}

pub use mesh_api::xds::metadata;

impl Proxy {
    /// Parses a node; the error says which part of the id or metadata is wrong.
    pub fn from_node(node: &Node) -> Result<Self, String> {
        let parts: Vec<&str> = node.id.split('~').collect();
        let [kind, ip, id, domain] = parts[..] else {
            return Err(format!(
                "node id {:?} is not of the form type~ip~pod.namespace~domain",
                node.id
            ));
        };
        let kind = match kind {
            "sidecar" => ProxyKind::Sidecar,
            "router" | "ingress" => ProxyKind::Router,
            other => {
                return Err(format!(
                    "node id {:?}: type {other:?} is not sidecar, router or ingress",
                    node.id
                ));
            }
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("node id {:?}: {ip:?} is not an IP address", node.id))?;
        let empty = Struct::default();
        let metadata = node.metadata.as_ref().unwrap_or(&empty);
        let string = |key: &str| match metadata.fields.get(key).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        };
        let namespace = string(metadata::NAMESPACE)
            .or_else(|| {
                let ns = domain.split('.').next().filter(|_| domain.contains('.'));
                ns.or_else(|| id.split('.').nth(1)).map(str::to_string)
            })
            .unwrap_or_default();
        let labels = labels(metadata.fields.get(metadata::LABELS))
            .map_err(|e| format!("node {:?}: metadata {}: {e}", node.id, metadata::LABELS))?;
        let interception = match string(metadata::INTERCEPTION_MODE).as_deref() {
            None | Some("REDIRECT") | Some("TPROXY") => Interception::Redirect,
            Some("NONE") => Interception::None,
            Some(other) => {
                return Err(format!(
                    "node {:?}: metadata {} {other:?} is not REDIRECT, TPROXY or NONE",
                    node.id,
                    metadata::INTERCEPTION_MODE
                ));
            }
        };
        Ok(Self {
            kind,
            id: id.to_string(),
            ip,
            namespace,
            domain: domain.to_string(),
            labels,
            service_account: string(metadata::SERVICE_ACCOUNT).unwrap_or_default(),
            interception,
        })
    }

    /// Whether every label of `selector` is one of the proxy's.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

fn labels(value: Option<&Value>) -> Result<BTreeMap<String, String>, String> {
    let fields: BTreeMap<String, Value> = match value.and_then(|v| v.kind.as_ref()) {
        None => return Ok(BTreeMap::new()),
        Some(Kind::StructValue(s)) => s.fields.clone().into_iter().collect(),
        Some(Kind::StringValue(json)) => {
            return serde_json::from_str(json)
                .map_err(|e| format!("not a JSON object of strings: {e}"));
        }
        Some(_) => return Err("neither a struct nor a JSON string".into()),
    };
    fields
        .into_iter()
        .map(|(k, v)| match v.kind {
            Some(Kind::StringValue(s)) => Ok((k, s)),
            _ => Err(format!("label {k:?} is not a string")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, metadata: &[(&str, Kind)]) -> Node {
        Node {
            id: id.into(),
            metadata: Some(Struct {
                fields: metadata
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            Value {
                                kind: Some(v.clone()),
                            },
                        )
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn reads_istio_node_ids_and_metadata() {
        let p = Proxy::from_node(&node(
            "sidecar~10.1.2.3~reviews-v1-abc.shop~shop.svc.cluster.local",
            &[
                (
                    metadata::LABELS,
                    Kind::StringValue(r#"{"app":"reviews","version":"v1"}"#.into()),
                ),
                (
                    metadata::INTERCEPTION_MODE,
                    Kind::StringValue("NONE".into()),
                ),
            ],
        ))
        .unwrap();
        assert_eq!(p.kind, ProxyKind::Sidecar);
        assert_eq!(p.ip.to_string(), "10.1.2.3");
        assert_eq!(p.namespace, "shop");
        assert_eq!(p.labels["version"], "v1");
        assert_eq!(p.interception, Interception::None);
        let router = Proxy::from_node(&node(
            "router~10.0.0.1~ingress.istio-system~istio-system.svc.cluster.local",
            &[(metadata::NAMESPACE, Kind::StringValue("gw".into()))],
        ))
        .unwrap();
        assert_eq!(
            (router.kind, router.namespace.as_str()),
            (ProxyKind::Router, "gw")
        );
    }

    #[test]
    fn refuses_malformed_nodes_naming_the_part() {
        let err = |id: &str, md: &[(&str, Kind)]| Proxy::from_node(&node(id, md)).unwrap_err();
        assert!(err("productpage", &[]).contains("not of the form"));
        assert!(err("proxy~1.2.3.4~a.b~b.svc", &[]).contains("type \"proxy\""));
        assert!(err("sidecar~nowhere~a.b~b.svc", &[]).contains("not an IP"));
        let bad_label = [(metadata::LABELS, Kind::StringValue("[1]".into()))];
        assert!(err("sidecar~1.2.3.4~a.b~b.svc", &bad_label).contains("LABELS"));
    }
}
