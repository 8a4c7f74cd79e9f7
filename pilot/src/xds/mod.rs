//! The xDS v3 server: distribution (streams, versions, nonces, ACK/NACK)
//! apart from generation (what each proxy should have), as in Envoy's
//! go-control-plane. The server asks a [`ResourceGenerator`] for resources
//! and knows nothing of where config comes from.

pub mod ads;
pub mod generate;

use std::collections::BTreeMap;

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
    /// `names` when it is not empty. Each resource is `(name, body)`.
    fn generate(
        &self,
        client: &Self::Client,
        type_url: &str,
        names: &[String],
    ) -> Vec<(String, Any)>;

    fn changes(&self) -> watch::Receiver<TypeVersions>;
}
