//! A control plane for generator tests: an MCP source on 127.0.0.1 serving
//! parsed YAML (the path Galley's config takes), Pilot following it, and
//! proxies that speak ADS to Pilot over real gRPC.

#![allow(dead_code)] // each test file uses its own part

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use component::{Admin, CancellationToken};
use envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::protobuf::{Struct, Value, value::Kind},
};
use mcp::{IncrementalPolicy, McpMetrics, SourceServer, Store};
use mesh_api::{kinds, object::ConfigObject};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

pub struct ControlPlane {
    pub store: Arc<Store>,
    pub xds: SocketAddr,
    pub admin: Admin,
    stop: CancellationToken,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ControlPlane {
    /// Pilot following a source that serves `yaml`.
    pub async fn start(yaml: &str) -> Self {
        Self::start_with(yaml, |_| {}).await
    }

    /// The same, with Pilot's flags adjusted by `configure`.
    pub async fn start_with(yaml: &str, configure: impl FnOnce(&mut pilot::PilotArgs)) -> Self {
        let store = Arc::new(Store::new(kinds::KINDS.iter().map(|k| k.collection)));
        publish(&store, yaml);
        let stop = CancellationToken::new();
        let mcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mcp_addr = mcp.local_addr().unwrap();
        SourceServer::new(
            store.clone(),
            IncrementalPolicy::All,
            McpMetrics::default(),
            stop.clone(),
        )
        .spawn(mcp);
        let xds = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut args = pilot::PilotArgs {
            mcp_server: mcp_addr.to_string(),
            xds_addr: xds,
            xds_tls_addr: "127.0.0.1:0".parse().unwrap(),
            tls_cert: None,
            tls_key: None,
            tls_root: None,
            debounce: Duration::from_millis(10),
            mesh_config: None,
            server_limits: Default::default(),
        };
        configure(&mut args);
        let admin = Admin::new("pilot");
        tokio::spawn(pilot::run(args, admin.clone(), stop.clone()));
        Self {
            store,
            xds,
            admin,
            stop,
        }
    }

    /// Replaces every collection Pilot reads with the objects of `yaml`.
    pub fn publish(&self, yaml: &str) {
        publish(&self.store, yaml);
    }

    pub async fn sidecar(&self, ip: &str, namespace: &str, labels: &[(&str, &str)]) -> Proxy {
        let id = format!("sidecar~{ip}~app.{namespace}~{namespace}.svc.cluster.local");
        Proxy::connect(self.xds, node(&id, labels, &[])).await
    }

    pub async fn proxy(&self, node: Node) -> Proxy {
        Proxy::connect(self.xds, node).await
    }
}

/// A node with Istio's id and `LABELS` and other string metadata.
pub fn node(id: &str, labels: &[(&str, &str)], metadata: &[(&str, &str)]) -> Node {
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let mut fields: std::collections::HashMap<String, Value> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), string(v)))
        .collect();
    fields.insert(
        "LABELS".into(),
        Value {
            kind: Some(Kind::StructValue(Struct {
                fields: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), string(v)))
                    .collect(),
            })),
        },
    );
    Node {
        id: id.into(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

fn publish(store: &Store, yaml: &str) {
    let objects = ConfigObject::parse_yaml(yaml, "test.yaml").unwrap();
    store
        .replace_with_objects(pilot::COLLECTIONS, &objects)
        .unwrap();
}

/// A proxy on a state-of-the-world stream; it ACKs everything it reads.
pub struct Proxy {
    node: Node,
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
    /// Names subscribed, by type; ACKs repeat them.
    names: BTreeMap<String, Vec<String>>,
    /// The last response of each type.
    pub last: BTreeMap<String, DiscoveryResponse>,
}

impl Proxy {
    pub async fn connect(xds: SocketAddr, node: Node) -> Self {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut client = loop {
            match AggregatedDiscoveryServiceClient::connect(format!("http://{xds}")).await {
                Ok(c) => break c,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("pilot's ADS port: {e}"),
            }
        };
        let (requests, rx) = mpsc::channel(8);
        let responses = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self {
            node,
            requests,
            responses,
            names: Default::default(),
            last: Default::default(),
        }
    }

    pub async fn subscribe(&mut self, type_url: &str, names: &[&str]) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.names.insert(type_url.to_string(), names.clone());
        self.send(type_url, names, None).await;
    }

    async fn send(
        &self,
        type_url: &str,
        names: Vec<String>,
        answering: Option<&DiscoveryResponse>,
    ) {
        self.requests
            .send(DiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: type_url.into(),
                resource_names: names,
                response_nonce: answering.map(|r| r.nonce.clone()).unwrap_or_default(),
                version_info: answering
                    .map(|r| r.version_info.clone())
                    .unwrap_or_default(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// The next response, ACKed.
    pub async fn next(&mut self) -> DiscoveryResponse {
        let r = tokio::time::timeout(Duration::from_secs(10), self.responses.next())
            .await
            .expect("a response within 10s")
            .expect("the stream is open")
            .expect("not an error");
        let names = self.names.get(&r.type_url).cloned().unwrap_or_default();
        self.send(&r.type_url.clone(), names, Some(&r)).await;
        self.last.insert(r.type_url.clone(), r.clone());
        r
    }

    /// Responses until one of `type_url` satisfies `done`.
    pub async fn until<M: Message + Default>(
        &mut self,
        type_url: &str,
        done: impl Fn(&[M]) -> bool,
    ) -> Vec<M> {
        if let Some(r) = self.last.get(type_url) {
            let decoded = decode(r);
            if done(&decoded) {
                return decoded;
            }
        }
        loop {
            let r = self.next().await;
            if r.type_url == type_url {
                let decoded = decode(&r);
                if done(&decoded) {
                    return decoded;
                }
            }
        }
    }

    /// Subscribes to `type_url` and returns the first answer.
    pub async fn fetch<M: Message + Default>(&mut self, type_url: &str, names: &[&str]) -> Vec<M> {
        self.last.remove(type_url);
        self.subscribe(type_url, names).await;
        self.until(type_url, |_: &[M]| true).await
    }
}

pub fn decode<M: Message + Default>(r: &DiscoveryResponse) -> Vec<M> {
    r.resources
        .iter()
        .map(|a| M::decode(&a.value[..]).unwrap())
        .collect()
}

/// Decodes an `Any` of a known type.
pub fn unpack<M: Message + Default>(any: &envoy_types::pb::google::protobuf::Any) -> M {
    M::decode(&any.value[..]).unwrap()
}
