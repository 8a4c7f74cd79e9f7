//! The xDS v3 facts Pilot and the proxy share: resource type URLs, and the
//! node metadata keys Istio's agent sends (what the node id cannot carry).

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Node metadata keys.
pub mod metadata {
    pub const NAMESPACE: &str = "CONFIG_NAMESPACE";
    pub const LABELS: &str = "LABELS";
    pub const INTERCEPTION_MODE: &str = "INTERCEPTION_MODE";
    pub const SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
    /// The proxy's version, as Istio's agent sends it; xDS v3 clients say
    /// it in the node's user agent instead.
    pub const PROXY_VERSION: &str = "ISTIO_PROXY_VERSION";
}

/// The node's user agent name of our proxy.
pub const PROXY_USER_AGENT: &str = "mesh-proxy";
