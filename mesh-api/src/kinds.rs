//! The config kinds carried in MCP bodies: for each collection, its body
//! message, its type URL and its Kubernetes-style YAML form. This table is
//! the one place those facts live; Galley, Pilot, Mixer and `meshctl` all
//! read them from here.

use prost::Message;
use serde_json::Value;

use crate::pb::istio::{authentication, mesh, mixer::v1::config::client, networking, policy, rbac};
use crate::pb::k8s::io::api::core::v1 as k8s_core;

/// A JSON parse error with the path of the field it is about.
pub type JsonError = serde_path_to_error::Error<serde_json::Error>;

macro_rules! bodies {
    ($($variant:ident => $ty:ty, $url:literal;)*) => {
        /// A decoded MCP body: one variant per message type. Messages are
        /// boxed: they range from bytes to a kilobyte, and a store holds
        /// thousands of bodies.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Body {
            $($variant(Box<$ty>),)*
        }

        /// The message types that bodies can have.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum BodyType {
            $($variant,)*
        }

        impl BodyType {
            pub fn type_url(self) -> &'static str {
                match self {
                    $(BodyType::$variant => concat!("type.googleapis.com/", $url),)*
                }
            }

            /// Decodes protobuf bytes into this type.
            pub fn decode(self, bytes: &[u8]) -> Result<Body, prost::DecodeError> {
                Ok(match self {
                    $(BodyType::$variant => Body::$variant(Box::new(<$ty>::decode(bytes)?)),)*
                })
            }

            /// Parses the proto3 JSON form (a Kubernetes object's `spec`).
            /// The error names the path of the offending field.
            pub fn from_json(self, mut json: Value) -> Result<Body, JsonError> {
                let message = self.type_url().trim_start_matches("type.googleapis.com/");
                crate::go_duration::normalize(message, &mut json);
                Ok(match self {
                    $(BodyType::$variant => Body::$variant(Box::new(serde_path_to_error::deserialize(json)?)),)*
                })
            }
        }

        impl Body {
            pub fn body_type(&self) -> BodyType {
                match self {
                    $(Body::$variant(_) => BodyType::$variant,)*
                }
            }

            pub fn encode_to_vec(&self) -> Vec<u8> {
                match self {
                    $(Body::$variant(m) => m.encode_to_vec(),)*
                }
            }

            /// The proto3 JSON form, camelCase field names.
            pub fn to_json(&self) -> Value {
                let json = match self {
                    $(Body::$variant(m) => serde_json::to_value(m),)*
                };
                // pbjson output is plain data (strings, numbers, maps); it
                // cannot fail to become a JSON value.
                json.unwrap_or(Value::Null)
            }

            /// The body as a `google.protobuf.Any`, as MCP carries it.
            pub fn to_any(&self) -> pbjson_types::Any {
                pbjson_types::Any {
                    type_url: self.body_type().type_url().to_string(),
                    value: self.encode_to_vec().into(),
                }
            }
        }
    };
}

bodies! {
    VirtualService => networking::v1alpha3::VirtualService, "istio.networking.v1alpha3.VirtualService";
    DestinationRule => networking::v1alpha3::DestinationRule, "istio.networking.v1alpha3.DestinationRule";
    Gateway => networking::v1alpha3::Gateway, "istio.networking.v1alpha3.Gateway";
    ServiceEntry => networking::v1alpha3::ServiceEntry, "istio.networking.v1alpha3.ServiceEntry";
    Sidecar => networking::v1alpha3::Sidecar, "istio.networking.v1alpha3.Sidecar";
    EnvoyFilter => networking::v1alpha3::EnvoyFilter, "istio.networking.v1alpha3.EnvoyFilter";
    Policy => authentication::v1alpha1::Policy, "istio.authentication.v1alpha1.Policy";
    ServiceRole => rbac::v1alpha1::ServiceRole, "istio.rbac.v1alpha1.ServiceRole";
    ServiceRoleBinding => rbac::v1alpha1::ServiceRoleBinding, "istio.rbac.v1alpha1.ServiceRoleBinding";
    RbacConfig => rbac::v1alpha1::RbacConfig, "istio.rbac.v1alpha1.RbacConfig";
    Rule => policy::v1beta1::Rule, "istio.policy.v1beta1.Rule";
    AttributeManifest => policy::v1beta1::AttributeManifest, "istio.policy.v1beta1.AttributeManifest";
    Handler => policy::v1beta1::Handler, "istio.policy.v1beta1.Handler";
    Instance => policy::v1beta1::Instance, "istio.policy.v1beta1.Instance";
    MeshConfig => mesh::v1alpha1::MeshConfig, "istio.mesh.v1alpha1.MeshConfig";
    HttpApiSpec => client::HttpapiSpec, "istio.mixer.v1.config.client.HTTPAPISpec";
    HttpApiSpecBinding => client::HttpapiSpecBinding, "istio.mixer.v1.config.client.HTTPAPISpecBinding";
    QuotaSpec => client::QuotaSpec, "istio.mixer.v1.config.client.QuotaSpec";
    QuotaSpecBinding => client::QuotaSpecBinding, "istio.mixer.v1.config.client.QuotaSpecBinding";
    // Mixer's adapter and template kinds, carried as Structs. Istio 1.1's
    // Galley registers these collections under a doubled type URL
    // (`type.googleapis.com/type.googleapis.com/...`) but sends bodies with
    // the plain one, as here; sinks compare the message name.
    LegacyStruct => pbjson_types::Struct, "google.protobuf.Struct";
    // Kubernetes objects, as Istio 1.1's Galley carries them (some as their
    // spec alone).
    K8sServiceSpec => k8s_core::ServiceSpec, "k8s.io.api.core.v1.ServiceSpec";
    K8sEndpoints => k8s_core::Endpoints, "k8s.io.api.core.v1.Endpoints";
    K8sPod => k8s_core::Pod, "k8s.io.api.core.v1.Pod";
    K8sNodeSpec => k8s_core::NodeSpec, "k8s.io.api.core.v1.NodeSpec";
    K8sNamespaceSpec => k8s_core::NamespaceSpec, "k8s.io.api.core.v1.NamespaceSpec";
}

/// One collection: what MCP calls it, what its bodies are, and how users
/// write it as a Kubernetes-style object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub collection: &'static str,
    pub body: BodyType,
    /// `apiVersion` of the YAML form; empty for kinds that are not objects.
    pub api_version: &'static str,
    pub kind: &'static str,
    /// Namespaced resources are named `namespace/name` (MCP rule 7).
    pub namespaced: bool,
}

impl Kind {
    /// The Kubernetes API group and version, from `apiVersion`.
    pub fn group_version(&self) -> (&'static str, &'static str) {
        self.api_version
            .split_once('/')
            .unwrap_or(("", self.api_version))
    }

    /// The Kubernetes resource (plural) name: the collection's last part.
    pub fn plural(&self) -> &'static str {
        self.collection.rsplit('/').next().unwrap_or_default()
    }
}

const fn kind(
    collection: &'static str,
    body: BodyType,
    api_version: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> Kind {
    Kind {
        collection,
        body,
        api_version,
        kind,
        namespaced,
    }
}

pub const VIRTUAL_SERVICES: &str = "istio/networking/v1alpha3/virtualservices";
pub const DESTINATION_RULES: &str = "istio/networking/v1alpha3/destinationrules";
pub const GATEWAYS: &str = "istio/networking/v1alpha3/gateways";
pub const SERVICE_ENTRIES: &str = "istio/networking/v1alpha3/serviceentries";
pub const SIDECARS: &str = "istio/networking/v1alpha3/sidecars";
pub const ENVOY_FILTERS: &str = "istio/networking/v1alpha3/envoyfilters";
pub const POLICIES: &str = "istio/authentication/v1alpha1/policies";
pub const MESH_POLICIES: &str = "istio/authentication/v1alpha1/meshpolicies";
pub const SERVICE_ROLES: &str = "istio/rbac/v1alpha1/serviceroles";
pub const SERVICE_ROLE_BINDINGS: &str = "istio/rbac/v1alpha1/servicerolebindings";
pub const RBAC_CONFIGS: &str = "istio/rbac/v1alpha1/rbacconfigs";
pub const CLUSTER_RBAC_CONFIGS: &str = "istio/rbac/v1alpha1/clusterrbacconfigs";
pub const RULES: &str = "istio/policy/v1beta1/rules";
pub const ATTRIBUTE_MANIFESTS: &str = "istio/policy/v1beta1/attributemanifests";
pub const HANDLERS: &str = "istio/policy/v1beta1/handlers";
pub const INSTANCES: &str = "istio/policy/v1beta1/instances";
pub const MESH_CONFIG: &str = "istio/mesh/v1alpha1/MeshConfig";
/// Services discovered from the platform, in ServiceEntry form, written by
/// Galley (never by users).
pub const SYNTHETIC_SERVICE_ENTRIES: &str = "istio/networking/v1alpha3/synthetic/serviceentries";
pub const HTTP_API_SPECS: &str = "istio/config/v1alpha2/httpapispecs";
pub const HTTP_API_SPEC_BINDINGS: &str = "istio/config/v1alpha2/httpapispecbindings";
pub const QUOTA_SPECS: &str = "istio/mixer/v1/config/client/quotaspecs";
pub const QUOTA_SPEC_BINDINGS: &str = "istio/mixer/v1/config/client/quotaspecbindings";
pub const K8S_SERVICES: &str = "k8s/core/v1/services";
pub const K8S_ENDPOINTS: &str = "k8s/core/v1/endpoints";
pub const K8S_PODS: &str = "k8s/core/v1/pods";
pub const K8S_NODES: &str = "k8s/core/v1/nodes";
pub const K8S_NAMESPACES: &str = "k8s/core/v1/namespaces";

/// The collections of [`KINDS`] that Istio 1.1's Galley does not serve.
pub const NOT_IN_ISTIO_1_1: [&str; 3] = [MESH_CONFIG, SYNTHETIC_SERVICE_ENTRIES, K8S_NAMESPACES];

const NETWORKING: &str = "networking.istio.io/v1alpha3";
const AUTHENTICATION: &str = "authentication.istio.io/v1alpha1";
const RBAC: &str = "rbac.istio.io/v1alpha1";
const POLICY: &str = "config.istio.io/v1alpha2";

/// One of Mixer's per-adapter or per-template kinds of Istio 1.1, whose
/// spec is free-form.
const fn legacy(collection: &'static str, kind_name: &'static str) -> Kind {
    kind(collection, BodyType::LegacyStruct, POLICY, kind_name, true)
}

/// Every collection this project knows: those of Istio 1.1's Galley, plus
/// [`NOT_IN_ISTIO_1_1`]: the mesh config, the synthetic service entries and
/// the namespaces.
pub const KINDS: &[Kind] = &[
    kind(
        VIRTUAL_SERVICES,
        BodyType::VirtualService,
        NETWORKING,
        "VirtualService",
        true,
    ),
    kind(
        DESTINATION_RULES,
        BodyType::DestinationRule,
        NETWORKING,
        "DestinationRule",
        true,
    ),
    kind(GATEWAYS, BodyType::Gateway, NETWORKING, "Gateway", true),
    kind(
        SERVICE_ENTRIES,
        BodyType::ServiceEntry,
        NETWORKING,
        "ServiceEntry",
        true,
    ),
    kind(SIDECARS, BodyType::Sidecar, NETWORKING, "Sidecar", true),
    kind(
        ENVOY_FILTERS,
        BodyType::EnvoyFilter,
        NETWORKING,
        "EnvoyFilter",
        true,
    ),
    kind(POLICIES, BodyType::Policy, AUTHENTICATION, "Policy", true),
    kind(
        MESH_POLICIES,
        BodyType::Policy,
        AUTHENTICATION,
        "MeshPolicy",
        false,
    ),
    kind(
        SERVICE_ROLES,
        BodyType::ServiceRole,
        RBAC,
        "ServiceRole",
        true,
    ),
    kind(
        SERVICE_ROLE_BINDINGS,
        BodyType::ServiceRoleBinding,
        RBAC,
        "ServiceRoleBinding",
        true,
    ),
    kind(RBAC_CONFIGS, BodyType::RbacConfig, RBAC, "RbacConfig", true),
    kind(
        CLUSTER_RBAC_CONFIGS,
        BodyType::RbacConfig,
        RBAC,
        "ClusterRbacConfig",
        false,
    ),
    kind(RULES, BodyType::Rule, POLICY, "rule", true),
    kind(
        ATTRIBUTE_MANIFESTS,
        BodyType::AttributeManifest,
        POLICY,
        "attributemanifest",
        true,
    ),
    kind(HANDLERS, BodyType::Handler, POLICY, "handler", true),
    kind(INSTANCES, BodyType::Instance, POLICY, "instance", true),
    kind(MESH_CONFIG, BodyType::MeshConfig, "", "MeshConfig", false),
    kind(
        SYNTHETIC_SERVICE_ENTRIES,
        BodyType::ServiceEntry,
        "",
        "ServiceEntry",
        true,
    ),
    kind(
        HTTP_API_SPECS,
        BodyType::HttpApiSpec,
        POLICY,
        "HTTPAPISpec",
        true,
    ),
    kind(
        HTTP_API_SPEC_BINDINGS,
        BodyType::HttpApiSpecBinding,
        POLICY,
        "HTTPAPISpecBinding",
        true,
    ),
    kind(QUOTA_SPECS, BodyType::QuotaSpec, POLICY, "QuotaSpec", true),
    kind(
        QUOTA_SPEC_BINDINGS,
        BodyType::QuotaSpecBinding,
        POLICY,
        "QuotaSpecBinding",
        true,
    ),
    kind(K8S_SERVICES, BodyType::K8sServiceSpec, "", "Service", true),
    kind(K8S_ENDPOINTS, BodyType::K8sEndpoints, "", "Endpoints", true),
    kind(K8S_PODS, BodyType::K8sPod, "", "Pod", true),
    kind(K8S_NODES, BodyType::K8sNodeSpec, "", "Node", false),
    kind(
        K8S_NAMESPACES,
        BodyType::K8sNamespaceSpec,
        "",
        "Namespace",
        false,
    ),
    legacy("istio/config/v1alpha2/adapters", "adapter"),
    legacy("istio/config/v1alpha2/templates", "template"),
    legacy("istio/config/v1alpha2/legacy/apikeys", "apikey"),
    legacy(
        "istio/config/v1alpha2/legacy/authorizations",
        "authorization",
    ),
    legacy("istio/config/v1alpha2/legacy/bypasses", "bypass"),
    legacy("istio/config/v1alpha2/legacy/checknothings", "checknothing"),
    legacy("istio/config/v1alpha2/legacy/circonuses", "circonus"),
    legacy("istio/config/v1alpha2/legacy/cloudwatches", "cloudwatch"),
    legacy("istio/config/v1alpha2/legacy/deniers", "denier"),
    legacy("istio/config/v1alpha2/legacy/dogstatsds", "dogstatsd"),
    legacy("istio/config/v1alpha2/legacy/edges", "edge"),
    legacy("istio/config/v1alpha2/legacy/fluentds", "fluentd"),
    legacy(
        "istio/config/v1alpha2/legacy/kubernetesenvs",
        "kubernetesenv",
    ),
    legacy("istio/config/v1alpha2/legacy/kuberneteses", "kubernetes"),
    legacy("istio/config/v1alpha2/legacy/listcheckers", "listchecker"),
    legacy("istio/config/v1alpha2/legacy/listentries", "listentry"),
    legacy("istio/config/v1alpha2/legacy/logentries", "logentry"),
    legacy("istio/config/v1alpha2/legacy/memquotas", "memquota"),
    legacy("istio/config/v1alpha2/legacy/metrics", "metric"),
    legacy("istio/config/v1alpha2/legacy/noops", "noop"),
    legacy("istio/config/v1alpha2/legacy/opas", "opa"),
    legacy("istio/config/v1alpha2/legacy/prometheuses", "prometheus"),
    legacy("istio/config/v1alpha2/legacy/quotas", "quota"),
    legacy("istio/config/v1alpha2/legacy/rbacs", "rbac"),
    legacy("istio/config/v1alpha2/legacy/redisquotas", "redisquota"),
    legacy(
        "istio/config/v1alpha2/legacy/reportnothings",
        "reportnothing",
    ),
    legacy("istio/config/v1alpha2/legacy/signalfxs", "signalfx"),
    legacy("istio/config/v1alpha2/legacy/solarwindses", "solarwinds"),
    legacy("istio/config/v1alpha2/legacy/stackdrivers", "stackdriver"),
    legacy("istio/config/v1alpha2/legacy/statsds", "statsd"),
    legacy("istio/config/v1alpha2/legacy/stdios", "stdio"),
    legacy("istio/config/v1alpha2/legacy/tracespans", "tracespan"),
    legacy("istio/config/v1alpha2/legacy/zipkins", "zipkin"),
];

pub fn by_collection(collection: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.collection == collection)
}

/// Looks a kind up by its YAML `apiVersion` and `kind`.
pub fn by_object_kind(api_version: &str, kind: &str) -> Option<&'static Kind> {
    KINDS
        .iter()
        .find(|k| !k.api_version.is_empty() && k.api_version == api_version && k.kind == kind)
}

/// MCP's name for a resource: `namespace/name` or `name` (rule 7).
pub fn resource_name(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_string(),
    }
}
