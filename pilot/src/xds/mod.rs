//! The xDS v3 server: distribution (streams, versions, nonces, ACK/NACK)
//! apart from generation (what each proxy should have), as in Envoy's
//! go-control-plane. The server asks a [`ResourceGenerator`] for resources
//! and knows nothing of where config comes from.

pub mod ads;
pub mod generate;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use envoy_types::pb::{envoy::config::core::v3::Node, google::protobuf::Any};
use tokio::sync::watch;

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The order in which pushes go out, so that a proxy has what a resource
/// refers to before the resource: clusters before their endpoints,
/// listeners before their routes.
pub const PUSH_ORDER: [&str; 5] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET];

/// A generated resource, with a hash of its name and body computed once:
/// streams compare and version resources by it without rehashing bytes,
/// and proxies of one scope share the same `Arc`s.
#[derive(Debug, PartialEq)]
pub struct Resource {
    pub name: Arc<str>,
    pub body: Any,
    pub hash: u64,
}

impl Resource {
    pub fn new(name: impl Into<Arc<str>>, body: Any) -> Arc<Self> {
        use std::hash::{Hash, Hasher};
        let name = name.into();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut hasher);
        body.type_url.hash(&mut hasher);
        body.value.hash(&mut hasher);
        Arc::new(Self {
            name,
            body,
            hash: hasher.finish(),
        })
    }
}

/// Per type URL, a counter that moves whenever generation for that type
/// may give other results. Counters, not flags: a stream that misses
/// intermediate values still sees every type that moved.
pub type TypeVersions = BTreeMap<String, u64>;

/// What each proxy should have.
pub trait ResourceGenerator: Send + Sync + 'static {
    /// What the generator knows of a connected proxy.
    type Client: Send + Sync + 'static;

    /// The proxy of a node; an error (a malformed node id) ends the stream
    /// with `InvalidArgument` and the reason.
    fn client(&self, node: &Node) -> Result<Self::Client, String>;

    /// The resources of `type_url` for `client`, only those named in
    /// `names` when it is not empty, in name order.
    fn generate(
        &self,
        client: &Self::Client,
        type_url: &str,
        names: &BTreeSet<String>,
    ) -> Vec<Arc<Resource>>;

    fn changes(&self) -> watch::Receiver<TypeVersions>;
}
