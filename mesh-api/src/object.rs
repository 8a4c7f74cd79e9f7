//! Config objects in their Kubernetes-style YAML/JSON form (`apiVersion`,
//! `kind`, `metadata`, `spec`), parsed into the same message types that MCP
//! bodies carry. Errors name the document, the object and the field path.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::{
    kinds::{self, Body, Kind},
    pb::istio::mcp::v1alpha1::{Metadata, Resource},
};

/// Namespace of namespaced objects that do not name one, as with `kubectl`.
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, Clone, PartialEq)]
pub struct ConfigObject {
    /// Where it was read and what it is, for messages:
    /// `file.yaml: document 2 (Gateway ns/edge)`.
    pub location: String,
    pub kind: &'static Kind,
    /// `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub body: Body,
}

#[derive(Debug, thiserror::Error)]
#[error("{location}: {message}")]
pub struct ObjectError {
    /// Where: document number and, once known, kind and name.
    pub location: String,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Value,
}

#[derive(Deserialize, Default)]
struct ObjectMeta {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl ConfigObject {
    /// Parses one object from its JSON value. `location` prefixes errors.
    pub fn from_json(value: Value, location: &str) -> Result<Self, ObjectError> {
        let err = |location: String, message: String| ObjectError { location, message };
        let envelope: Envelope = serde_json::from_value(value)
            .map_err(|e| err(location.to_string(), format!("not a config object: {e}")))?;
        let api_version = envelope.api_version.unwrap_or_default();
        let kind_name = envelope.kind.unwrap_or_default();
        let kind = kinds::by_object_kind(&api_version, &kind_name).ok_or_else(|| {
            err(
                location.to_string(),
                format!("unknown kind {kind_name:?} of apiVersion {api_version:?}"),
            )
        })?;
        let name = envelope
            .metadata
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                err(
                    format!("{location} ({kind_name})"),
                    "metadata.name is missing".into(),
                )
            })?;
        let namespace = kind.namespaced.then(|| {
            envelope
                .metadata
                .namespace
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| DEFAULT_NAMESPACE.into())
        });
        let location = format!(
            "{location} ({kind_name} {})",
            kinds::resource_name(namespace.as_deref(), &name)
        );
        let spec = if envelope.spec.is_null() {
            Value::Object(Default::default())
        } else {
            envelope.spec
        };
        let body = kind.body.from_json(spec).map_err(|e| {
            err(
                location.clone(),
                format!("spec.{}: {}", e.path(), e.inner()),
            )
        })?;
        Ok(Self {
            location,
            kind,
            namespace,
            name,
            labels: envelope.metadata.labels,
            annotations: envelope.metadata.annotations,
            body,
        })
    }

    /// Parses every object of a (multi-document) YAML text. Empty documents
    /// are skipped. `source` (a file name) prefixes errors.
    pub fn parse_yaml(text: &str, source: &str) -> Result<Vec<Self>, ObjectError> {
        let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| ObjectError {
            location: source.to_string(),
            message: format!("invalid YAML: {e}"),
        })?;
        docs.into_iter()
            .enumerate()
            .filter(|(_, doc)| !doc.is_null())
            .map(|(i, doc)| Self::from_json(doc, &format!("{source}: document {}", i + 1)))
            .collect()
    }

    /// The Kubernetes-style form: `apiVersion`, `kind`, `metadata`, `spec`.
    pub fn to_json(&self) -> Value {
        let mut metadata = serde_json::Map::new();
        metadata.insert("name".into(), self.name.clone().into());
        if let Some(ns) = &self.namespace {
            metadata.insert("namespace".into(), ns.clone().into());
        }
        if !self.labels.is_empty() {
            metadata.insert(
                "labels".into(),
                serde_json::to_value(&self.labels).unwrap_or_default(),
            );
        }
        if !self.annotations.is_empty() {
            metadata.insert(
                "annotations".into(),
                serde_json::to_value(&self.annotations).unwrap_or_default(),
            );
        }
        serde_json::json!({
            "apiVersion": self.kind.api_version,
            "kind": self.kind.kind,
            "metadata": metadata,
            "spec": self.body.to_json(),
        })
    }

    /// MCP's name for this object (rule 7).
    pub fn mcp_name(&self) -> String {
        kinds::resource_name(self.namespace.as_deref(), &self.name)
    }

    /// The object as an MCP resource (see [`versioned_resource`]).
    pub fn to_resource(&self) -> Resource {
        versioned_resource(self.mcp_name(), &self.body, &self.labels, &self.annotations)
    }
}

/// An MCP resource whose version is a hash of everything it carries, so it
/// changes exactly when the resource does and is the same in every process
/// that reads the same content. The body is hashed in its JSON form, whose
/// maps are ordered: protobuf encodings of `google.protobuf.Struct` order
/// map entries arbitrarily.
pub fn versioned_resource(
    name: String,
    body: &Body,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Resource {
    let any = body.to_any();
    let mut hash = Fnv1a::default();
    hash.write(any.type_url.as_bytes());
    hash.write(body.to_json().to_string().as_bytes());
    for (k, v) in labels.iter().chain(annotations) {
        hash.write(k.as_bytes());
        hash.write(v.as_bytes());
    }
    Resource {
        metadata: Some(Metadata {
            name,
            version: format!("{:016x}", hash.0),
            labels: labels.clone(),
            annotations: annotations.clone(),
            create_time: None,
        }),
        body: Some(any),
    }
}

/// 64-bit FNV-1a: a small, stable content hash for resource versions.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Separate fields so that ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
}
