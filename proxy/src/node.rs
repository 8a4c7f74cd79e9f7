//! Who this proxy is, as Pilot reads it: the node id in Istio's form
//! `<sidecar|router>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>` and the
//! metadata the id cannot carry (labels, namespace, interception mode,
//! service account).

use std::{collections::BTreeMap, net::IpAddr};

use clap::{Args, ValueEnum};
use envoy_types::pb::{
    envoy::config::core::v3::{Node, node::UserAgentVersionType},
    google::protobuf::{Struct, Value, value::Kind},
};
use mesh_api::xds::metadata;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Interception {
    /// Local mode: every listener binds its own address.
    None,
    /// Kubernetes mode: iptables redirects traffic to 15001 and 15006.
    Redirect,
}

/// What the proxy is to Pilot, Istio's node type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NodeType {
    /// Beside a workload: its inbound and outbound traffic.
    Sidecar,
    /// A gateway (Istio's `istio-ingressgateway` and
    /// `istio-egressgateway`): serves the Gateways that select its labels.
    Router,
}

#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// A sidecar, or a gateway (`router`).
    #[arg(long = "type", value_enum, default_value_t = NodeType::Sidecar)]
    pub node_type: NodeType,
    /// The workload's IP address.
    #[arg(long, env = "INSTANCE_IP", default_value = "127.0.0.1")]
    pub ip: IpAddr,
    /// The pod (or, in local mode, workload instance) name.
    #[arg(long, env = "POD_NAME", default_value = "proxy")]
    pub pod: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    /// The workload's labels, `key=value` pairs separated by commas.
    #[arg(long, env = "ISTIO_META_LABELS", value_parser = parse_labels, default_value = "")]
    pub labels: Labels,
    #[arg(long, value_enum, default_value_t = Interception::None)]
    pub interception: Interception,
    #[arg(long, default_value = "cluster.local")]
    pub dns_domain: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(pub BTreeMap<String, String>);

fn parse_labels(text: &str) -> Result<Labels, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("label {pair:?} is not key=value"))?;
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(Labels(labels))
}

impl NodeArgs {
    pub fn id(&self) -> String {
        let kind = match self.node_type {
            NodeType::Sidecar => "sidecar",
            NodeType::Router => "router",
        };
        format!(
            "{kind}~{}~{}.{}~{}.svc.{}",
            self.ip, self.pod, self.namespace, self.namespace, self.dns_domain
        )
    }

    pub fn node(&self) -> Node {
        let string = |s: &str| Value {
            kind: Some(Kind::StringValue(s.to_string())),
        };
        let labels = Struct {
            fields: self
                .labels
                .0
                .iter()
                .map(|(k, v)| (k.clone(), string(v)))
                .collect(),
        };
        let interception = match self.interception {
            Interception::None => "NONE",
            Interception::Redirect => "REDIRECT",
        };
        let fields = [
            (metadata::NAMESPACE, string(&self.namespace)),
            (metadata::INTERCEPTION_MODE, string(interception)),
            (metadata::SERVICE_ACCOUNT, string(&self.service_account)),
            (
                metadata::LABELS,
                Value {
                    kind: Some(Kind::StructValue(labels)),
                },
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Node {
            id: self.id(),
            cluster: self
                .labels
                .0
                .get("app")
                .cloned()
                .unwrap_or_else(|| self.pod.clone()),
            metadata: Some(Struct { fields }),
            user_agent_name: mesh_api::xds::PROXY_USER_AGENT.into(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            )),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_name_what_is_wrong() {
        let labels = parse_labels("app=reviews, version=v2").unwrap();
        assert_eq!(labels.0["version"], "v2");
        assert!(parse_labels("app").unwrap_err().contains("\"app\""));
    }
}
