//! What the Mixer tests share: a Mixer following an in-process MCP source
//! that serves parsed YAML, on 127.0.0.1.

// Each test binary uses a part of this.
#![allow(dead_code)]

use std::sync::Arc;

use component::{Admin, CancellationToken};
use mcp::{IncrementalPolicy, McpMetrics, SourceServer, Store};
use mesh_api::{kinds, object::ConfigObject};

/// Replaces every collection Mixer reads with the objects of `yaml`.
pub fn publish(store: &Store, yaml: &str) {
    let objects = ConfigObject::parse_yaml(yaml, "test.yaml").unwrap();
    store
        .replace_with_objects(mixer::COLLECTIONS, &objects)
        .unwrap();
}

pub struct Running {
    pub store: Arc<Store>,
    pub grpc: std::net::SocketAddr,
    /// The exporter's address (the telemetry role serves it).
    pub prometheus: std::net::SocketAddr,
    pub admin: Admin,
    /// Where `admin` serves (`/debug/config` lists config problems).
    pub admin_addr: std::net::SocketAddr,
    /// Stops the MCP source alone, as if Galley went away.
    pub source_stop: CancellationToken,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Mixer in `role`, its config `yaml` served over MCP. Requests wait on
/// the bound listener until Mixer serves; the config arrives after.
pub async fn start(yaml: &str, role: mixer::Role) -> Running {
    start_limited(yaml, role, Default::default()).await
}

/// [`start`] with load shedding limits.
pub async fn start_limited(yaml: &str, role: mixer::Role, limits: mixer::shed::Limits) -> Running {
    let store = Arc::new(Store::new(kinds::KINDS.iter().map(|k| k.collection)));
    publish(&store, yaml);
    let stop = CancellationToken::new();
    let mcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mcp_addr = mcp.local_addr().unwrap();
    let source_stop = stop.child_token();
    SourceServer::new(
        store.clone(),
        IncrementalPolicy::All,
        McpMetrics::default(),
        source_stop.clone(),
    )
    .spawn(mcp);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = listener.local_addr().unwrap();
    let prometheus = testkit::free_addr();
    let args = mixer::MixerArgs {
        role,
        mcp_server: mcp_addr.to_string(),
        grpc_addr: grpc,
        prometheus_addr: prometheus,
        limits,
        server_limits: Default::default(),
    };
    let admin = Admin::new("mixer");
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin_listener.local_addr().unwrap();
    tokio::spawn({
        let admin = admin.clone();
        let stop = stop.clone();
        async move { admin.serve(admin_listener, stop).await }
    });
    tokio::spawn(mixer::run_on(listener, args, admin.clone(), stop.clone()));
    Running {
        store,
        grpc,
        prometheus,
        admin,
        admin_addr,
        source_stop,
        stop,
    }
}
