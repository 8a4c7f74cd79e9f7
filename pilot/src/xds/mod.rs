//! The xDS v3 server: distribution (streams, versions, nonces, ACK/NACK)
//! apart from generation (what each proxy should have), as in Envoy's
//! go-control-plane. The server asks a [`ResourceGenerator`] for resources
//! and knows nothing of where config comes from.

pub mod ads;
pub mod generate;
mod set;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use prost::{Message, Name};
use tokio::sync::watch;

pub use mesh_api::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET};
pub use set::{Diff, Generated, ResourceSet};

/// The order in which pushes go out, so that a proxy has what a resource
/// refers to before the resource: clusters before their endpoints,
/// listeners before their routes.
pub const PUSH_ORDER: [&str; 5] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET];

/// A generated resource, encoded once as a `google.protobuf.Any` and
/// shared by every proxy it goes to: responses are framed from these
/// bytes, never re-encoded. The hash of its name and bytes, computed once,
/// lets streams compare and version resources without rehashing.
#[derive(Debug, PartialEq)]
pub struct Resource {
    pub name: Arc<str>,
    pub any: Bytes,
    pub hash: u64,
}

impl Resource {
    pub fn new<M: Message + Name>(name: impl Into<Arc<str>>, message: &M) -> Arc<Self> {
        let type_url = M::type_url();
        let mut any = Vec::with_capacity(
            prost::encoding::string::encoded_len(1, &type_url)
                + prost::encoding::message::encoded_len(2, message),
        );
        prost::encoding::string::encode(1, &type_url, &mut any);
        // `Any.value` is bytes, encoded as a message field is.
        prost::encoding::message::encode(2, message, &mut any);
        Self::from_any(name, Bytes::from(any))
    }

    /// A resource a proxy declared holding, known by name and content hash
    /// only.
    pub(crate) fn declared(name: impl Into<Arc<str>>, hash: u64) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            any: Bytes::new(),
            hash,
        })
    }

    /// From the bytes of an encoded `Any`.
    pub fn from_any(name: impl Into<Arc<str>>, any: Bytes) -> Arc<Self> {
        use std::hash::{Hash, Hasher};
        let name = name.into();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut hasher);
        any.hash(&mut hasher);
        Arc::new(Self {
            name,
            any,
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
    /// `names` when it is not empty. `names` is shared by every stream that
    /// subscribes to the same names, so that a generator may keep one
    /// selection for all of them.
    fn generate(
        &self,
        client: &Self::Client,
        type_url: &str,
        names: &Arc<BTreeSet<String>>,
    ) -> Generated;

    fn changes(&self) -> watch::Receiver<TypeVersions>;

    /// The trace of the latest change, which responses sent now carry.
    fn trace(&self) -> Option<opentelemetry::trace::SpanContext> {
        None
    }
}
