//! The xDS v3 server: distribution (streams, versions, nonces, ACK/NACK)
//! apart from generation (what each proxy should have), as in Envoy's
//! go-control-plane. The server asks a [`ResourceGenerator`] for resources
//! and knows nothing of where config comes from.

pub mod ads;
pub mod generate;

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

/// What each proxy should have.
pub trait ResourceGenerator: Send + Sync + 'static {
    /// The resources of `type_url` for the proxy `node`, only those named in
    /// `names` when it is not empty. Each resource is `(name, body)`.
    fn generate(&self, node: &Node, type_url: &str, names: &[String]) -> Vec<(String, Any)>;

    /// A counter that moves whenever generation may give other results.
    fn changes(&self) -> watch::Receiver<u64>;
}
