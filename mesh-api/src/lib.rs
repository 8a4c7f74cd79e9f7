//! Istio 1.1's APIs as the mesh speaks them.
//!
//! - [`pb`]: prost/tonic/pbjson code generated from this crate's `.proto`
//!   files (MCP, the Istio config kinds, the Mixer API, the CA API, the
//!   Kubernetes core objects Galley serves).
//! - [`kinds`]: the table of config collections, their body types and their
//!   YAML/JSON forms.
//! - [`object`]: config objects in their Kubernetes-style YAML form.
//! - [`mesh`]: the mesh config's defaults and its file.
//! - [`policy`]: how Mixer's config objects name each other.
//! - [`networking`]: networking rules Galley and Pilot both apply.
//! - [`synthetic`]: Kubernetes services as ServiceEntries, for Galley and
//!   for Pilot.
//! - [`xds`]: the xDS type URLs and node metadata keys Pilot and the proxy
//!   share.

mod go_duration;
pub mod kinds;
pub mod mesh;
pub mod networking;
pub mod object;
pub mod pb;
pub mod policy;
pub mod safe_regex;
pub mod synthetic;
pub mod xds;

/// The protobuf well-known types the generated code uses, with serde.
pub use pbjson_types as wkt;
