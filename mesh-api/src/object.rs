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
    /// The bound of [`YamlLimits`] the text broke, if that is what is wrong.
    pub exceeded: Option<Limit>,
}

/// Bounds on one YAML text, so that a file too big to hold is refused whole,
/// naming the bound, rather than parsed into memory. The defaults take a
/// YAML dump of a large cluster (a hundred thousand objects).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct YamlLimits {
    pub documents: usize,
    pub bytes: usize,
    /// Nesting of mappings and sequences.
    pub depth: usize,
}

impl Default for YamlLimits {
    fn default() -> Self {
        Self {
            documents: 100_000,
            bytes: 64 << 20,
            depth: 64,
        }
    }
}

/// One of the bounds of [`YamlLimits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Documents,
    Bytes,
    Depth,
}

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Limit::Documents => "documents",
            Limit::Bytes => "bytes",
            Limit::Depth => "depth",
        }
    }
}

impl YamlLimits {
    /// The parser's budget: documents and depth as given; its other counts
    /// (nodes, events, scalar bytes) no tighter than the byte bound, so that
    /// they never refuse a file the bounds here allow.
    fn budget(&self) -> serde_saphyr::Budget {
        let mut budget = serde_saphyr::Budget::default();
        budget.max_documents = self.documents;
        budget.max_depth = self.depth;
        budget.max_nodes = budget.max_nodes.max(self.bytes);
        budget.max_events = budget.max_events.max(2 * self.bytes);
        budget.max_total_scalar_bytes = budget.max_total_scalar_bytes.max(self.bytes);
        budget
    }

    /// Refuses a text of `len` bytes over the bound; callers that read
    /// files check their length first, so that none is read whole only to
    /// be refused.
    pub fn check_bytes(&self, len: u64, source: &str) -> Result<(), ObjectError> {
        if len <= self.bytes as u64 {
            return Ok(());
        }
        Err(ObjectError {
            location: source.to_string(),
            message: format!(
                "{len} bytes, over the limit of {} bytes per file",
                self.bytes
            ),
            exceeded: Some(Limit::Bytes),
        })
    }

    /// Why `error` broke a bound, if it did.
    fn breach(&self, error: &serde_saphyr::Error) -> Option<(Limit, String)> {
        use serde_saphyr::budget::BudgetBreach;
        let serde_saphyr::Error::Budget { breach, .. } = error.without_snippet() else {
            return None;
        };
        match breach {
            BudgetBreach::Documents { .. } => Some((
                Limit::Documents,
                format!("more than {} YAML documents in one file", self.documents),
            )),
            BudgetBreach::Depth { depth } => Some((
                Limit::Depth,
                format!("nested {depth} deep, over the limit of {}", self.depth),
            )),
            _ => None,
        }
    }
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
        let err = |location: String, message: String| ObjectError {
            location,
            message,
            exceeded: None,
        };
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

    /// Parses every object of a (multi-document) YAML text within the
    /// default [`YamlLimits`]. Empty documents are skipped. `source` (a file
    /// name) prefixes errors.
    pub fn parse_yaml(text: &str, source: &str) -> Result<Vec<Self>, ObjectError> {
        Self::parse_yaml_within(text, source, &YamlLimits::default())
    }

    /// [`ConfigObject::parse_yaml`] within `limits`.
    pub fn parse_yaml_within(
        text: &str,
        source: &str,
        limits: &YamlLimits,
    ) -> Result<Vec<Self>, ObjectError> {
        limits.check_bytes(text.len() as u64, source)?;
        let mut options = serde_saphyr::Options::default();
        options.budget = Some(limits.budget());
        let docs: Vec<Value> =
            serde_saphyr::from_multiple_with_options(text, options).map_err(|e| {
                let (exceeded, message) = match limits.breach(&e) {
                    Some((limit, message)) => (Some(limit), message),
                    None => (None, format!("invalid YAML: {e}")),
                };
                ObjectError {
                    location: source.to_string(),
                    message,
                    exceeded,
                }
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
