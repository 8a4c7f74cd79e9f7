//! `config.istio.io`: Mixer's rules, attribute manifests, handlers and
//! instances, and what of them this mesh's Mixer runs.

use mesh_api::pb::istio::policy::v1beta1 as policy;

use super::{Check, Field};

/// A warning when this mesh's Mixer does not run the handler's adapter or
/// the instance's template (`what`), named by its compiled name or, for
/// Istio's out-of-process adapters and templates, its plain one.
pub(super) fn run_by_mixer(
    c: &mut Check,
    s: &Field,
    what: &str,
    compiled: &str,
    named: &str,
    run: &[&str],
) {
    let (field, name) = if compiled.is_empty() {
        (what.to_string(), named)
    } else {
        (
            format!("compiled{}{}", what[..1].to_uppercase(), &what[1..]),
            compiled,
        )
    };
    if !name.is_empty() && !run.contains(&name) {
        c.ignored(
            s.at(&field),
            format!(
                "this mesh's Mixer does not run the {what} {name:?} (it runs {}); \
                 rules that name this are left out",
                run.join(", ")
            ),
        );
    }
}

pub(super) fn rule(c: &mut Check, s: &Field, r: &policy::Rule) {
    for (i, action) in r.actions.iter().enumerate() {
        c.require(
            !action.handler.is_empty(),
            s.at("actions").index(i).at("handler"),
            "an action needs a handler",
        );
    }
}

pub(super) fn attribute_manifest(c: &mut Check, s: &Field, m: &policy::AttributeManifest) {
    for (name, info) in &m.attributes {
        c.require(
            info.value_type != policy::ValueType::Unspecified as i32,
            s.at("attributes").key(name).at("valueType"),
            "every attribute needs a value type",
        );
    }
}
