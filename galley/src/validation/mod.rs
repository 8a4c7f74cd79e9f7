//! Semantic validation of config objects: the rules of each kind that Istio
//! 1.1 enforces beyond the schema (which parsing already checks). Every
//! path into the mesh uses it: the directory source, `meshctl validate`,
//! the Kubernetes source and the admission webhook.
//!
//! A problem names the field path (`spec.http[0].route[1].weight`) and the
//! reason; the caller adds the file or `namespace/name`. An error keeps the
//! object from being served. A warning marks what the mesh accepts but
//! does not honour (a field no component applies, a kind only Istio's own
//! components run): the object is served and the user is told, so nothing
//! is dropped silently. Where ignoring a field would weaken security, it
//! is an error instead.

mod common;
mod networking;
mod policy;
mod security;

use std::{collections::BTreeMap, fmt};

use mesh_api::{
    kinds::{self, Body},
    object::ConfigObject,
    policy as names,
};

pub use self::common::is_dns1123_label;
use self::{networking::*, policy::*, security::*};

/// A field path from an object's top (`spec.http[0].route[1].weight`),
/// built as the rules descend, so that no rule types a path by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field(String);

impl Field {
    pub fn spec() -> Self {
        Self("spec".into())
    }

    pub fn metadata() -> Self {
        Self("metadata".into())
    }

    /// Its field `name`, as the YAML spells it.
    pub fn at(&self, name: &str) -> Self {
        Self(format!("{}.{name}", self.0))
    }

    /// Item `i` of it, a list.
    pub fn index(&self, i: usize) -> Self {
        Self(format!("{}[{i}]", self.0))
    }

    /// The entry `key` of it, a map.
    pub fn key(&self, key: &str) -> Self {
        Self(format!("{}[{key:?}]", self.0))
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One thing wrong with an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where, from the object's top: `spec.hosts[0]`, `metadata.name`.
    pub field: String,
    pub reason: String,
    pub severity: Severity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The object is refused.
    Error,
    /// The object is served; part of it is not honoured.
    Warning,
}

impl Problem {
    pub fn error(field: impl fmt::Display, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            reason: reason.into(),
            severity: Severity::Error,
        }
    }

    pub fn warning(field: impl fmt::Display, reason: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(field, reason)
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Problems found so far, each under its field path.
#[derive(Default)]
struct Check {
    problems: Vec<Problem>,
}

impl Check {
    fn fail(&mut self, field: impl fmt::Display, reason: impl Into<String>) {
        self.problems.push(Problem::error(field, reason));
    }

    /// Accepted, but not honoured: `reason` says what happens instead.
    fn ignored(&mut self, field: impl fmt::Display, reason: impl Into<String>) {
        self.problems.push(Problem::warning(field, reason));
    }

    fn require(&mut self, ok: bool, field: impl fmt::Display, reason: &str) {
        if !ok {
            self.fail(field, reason);
        }
    }
}

/// The object's own problems (rules that need no other object).
pub fn validate(object: &ConfigObject) -> Vec<Problem> {
    let mut c = Check::default();
    let s = &Field::spec();
    match &object.body {
        Body::VirtualService(vs) => virtual_service(&mut c, s, vs),
        Body::DestinationRule(dr) => destination_rule(&mut c, s, dr),
        Body::Gateway(gw) => gateway(&mut c, s, gw),
        Body::ServiceEntry(se) => service_entry(&mut c, s, se),
        Body::Sidecar(sc) => sidecar(&mut c, s, sc),
        Body::EnvoyFilter(ef) => envoy_filter(&mut c, s, ef),
        Body::Policy(p) => authentication_policy(&mut c, s, p),
        Body::ServiceRole(r) => service_role(&mut c, s, r),
        Body::ServiceRoleBinding(b) => service_role_binding(&mut c, s, b),
        Body::RbacConfig(r) => rbac_config(&mut c, s, r),
        Body::Rule(r) => rule(&mut c, s, r),
        Body::Handler(h) => {
            c.require(
                !h.adapter.is_empty() || !h.compiled_adapter.is_empty(),
                s,
                "a handler names an adapter or a compiledAdapter",
            );
            run_by_mixer(
                &mut c,
                s,
                "adapter",
                &h.compiled_adapter,
                &h.adapter,
                names::ADAPTERS,
            );
        }
        Body::Instance(i) => {
            c.require(
                !i.template.is_empty() || !i.compiled_template.is_empty(),
                s,
                "an instance names a template or a compiledTemplate",
            );
            let (compiled, named) = (&i.compiled_template, &i.template);
            run_by_mixer(&mut c, s, "template", compiled, named, names::TEMPLATES);
        }
        Body::AttributeManifest(m) => attribute_manifest(&mut c, s, m),
        Body::HttpApiSpec(_)
        | Body::HttpApiSpecBinding(_)
        | Body::QuotaSpec(_)
        | Body::QuotaSpecBinding(_) => c.ignored(
            s,
            "served for Istio's own Pilot; this mesh's proxies take their Mixer quotas \
             and API attributes from their own flags, not from this kind",
        ),
        Body::LegacyStruct(_) if !names::runs_legacy(object.kind.kind) => c.ignored(
            s,
            format!(
                "kind {} is served for Istio's own Mixer; this mesh's Mixer does not \
                 run it (it runs the adapters {} and the templates {})",
                object.kind.kind,
                names::ADAPTERS.join(", "),
                names::TEMPLATES.join(", ")
            ),
        ),
        Body::LegacyStruct(_) => {}
        Body::MeshConfig(_)
        | Body::K8sServiceSpec(_)
        | Body::K8sEndpoints(_)
        | Body::K8sPod(_)
        | Body::K8sNodeSpec(_)
        | Body::K8sNamespaceSpec(_) => {}
    }
    if object.kind.namespaced
        && !is_dns1123_label(&object.name)
        && matches!(object.body, Body::Gateway(_))
    {
        c.fail(
            Field::metadata().at("name"),
            format!("{:?} is not a DNS-1123 label", object.name),
        );
    }
    c.problems
}

/// Every problem of a set of objects, their own and between them, by the
/// index of the object they concern.
pub fn validate_all(objects: &[&ConfigObject]) -> BTreeMap<usize, Vec<Problem>> {
    let mut found: BTreeMap<usize, Vec<Problem>> = BTreeMap::new();
    for (i, object) in objects.iter().enumerate() {
        let own = validate(object);
        if !own.is_empty() {
            found.insert(i, own);
        }
    }
    for (i, problem) in validate_references(objects) {
        found.entry(i).or_default().push(problem);
    }
    found
}

/// Whether objects of `kind` take part in [`validate_references`]: Mixer
/// rules, and the handlers and instances they name.
pub fn has_references(kind: &kinds::Kind) -> bool {
    matches!(
        kind.collection,
        kinds::RULES | kinds::HANDLERS | kinds::INSTANCES
    ) || kind.collection.starts_with(LEGACY_PREFIX)
}

const LEGACY_PREFIX: &str = "istio/config/v1alpha2/legacy/";

/// Problems between objects: Mixer rules whose actions name handlers or
/// instances that do not exist (by Istio 1.1's naming,
/// [`mesh_api::policy`]), or that exist only in a legacy per-adapter or
/// per-template kind this mesh's Mixer does not run. Returns
/// `(index into objects, problem)`.
pub fn validate_references(objects: &[&ConfigObject]) -> Vec<(usize, Problem)> {
    // Every object's full name, and whether this mesh's Mixer runs it.
    let mut known: BTreeMap<String, bool> = BTreeMap::new();
    for o in objects {
        let ns = o.namespace.as_deref().unwrap_or_default();
        let run = match o.kind.collection {
            kinds::HANDLERS | kinds::INSTANCES => true,
            c if c.starts_with(LEGACY_PREFIX) => names::runs_legacy(o.kind.kind),
            _ => continue,
        };
        known.insert(names::full_name(&o.name, o.kind.kind, ns), run);
    }
    let mut out = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        let Body::Rule(r) = &o.body else { continue };
        let ns = o.namespace.as_deref().unwrap_or_default();
        let mut check = |field: &Field, reference: &str, kind: &str| match names::resolve(
            reference,
            kind,
            ns,
            |name| known.get(name),
        ) {
            None => out.push((
                i,
                Problem::error(field, format!("no {kind} {reference:?} exists")),
            )),
            Some((name, false)) => out.push((
                i,
                Problem::warning(
                    field,
                    format!(
                        "{name} is of a kind served for Istio's own Mixer, not run by \
                         this mesh's Mixer"
                    ),
                ),
            )),
            Some((_, true)) => {}
        };
        for (a, action) in r.actions.iter().enumerate() {
            if !action.handler.is_empty() {
                check(
                    &Field::spec().at("actions").index(a).at("handler"),
                    &action.handler,
                    names::HANDLER,
                );
            }
            for (k, instance) in action.instances.iter().enumerate() {
                check(
                    &Field::spec()
                        .at("actions")
                        .index(a)
                        .at("instances")
                        .index(k),
                    instance,
                    names::INSTANCE,
                );
            }
        }
    }
    out
}
