//! How Mixer's config objects name each other, by Istio 1.1's rules. Galley
//! checks references with these functions and Mixer resolves them with the
//! same ones, so that both agree on what a name means.
//!
//! Every object of kind `kind` (`handler`, `instance`, `rule`, or a legacy
//! per-adapter or per-template kind such as `denier` or `metric`) named
//! `name` in `namespace` is known by its full name `name.kind.namespace`.
//! An adapter's params (a prometheus metric's `instance_name`, a memquota
//! limit's `name`) name an instance by that full name exactly.

/// The kind of `kind: handler` objects.
pub const HANDLER: &str = "handler";
/// The kind of `kind: instance` objects.
pub const INSTANCE: &str = "instance";

/// The adapters this mesh's Mixer runs (a handler's `compiledAdapter`).
pub const ADAPTERS: &[&str] = &["denier", "listchecker", "memquota", "prometheus", "stdio"];
/// The templates it builds instances of (an instance's `compiledTemplate`).
pub const TEMPLATES: &[&str] = &["checknothing", "listentry", "quota", "logentry", "metric"];

/// Whether this mesh's Mixer runs objects of a legacy per-adapter or
/// per-template `kind` (`prometheus`, `metric`): those of the adapters and
/// templates it runs, read as a handler or an instance of that kind. Istio
/// 1.1's own telemetry config is written in them.
pub fn runs_legacy(kind: &str) -> bool {
    ADAPTERS.contains(&kind) || TEMPLATES.contains(&kind)
}

/// The full name of object `name` of `kind` in `namespace`.
pub fn full_name(name: &str, kind: &str, namespace: &str) -> String {
    format!("{name}.{kind}.{namespace}")
}

/// The full names a rule in `namespace` may mean by `reference` to a
/// handler or an instance (`kind`), in the order Mixer tries them:
/// - `name`: that object of `kind` in the rule's namespace;
/// - `name.x`: `name` of kind `x` in the rule's namespace (the older
///   form, `denyall.denier`), else `name` of `kind` in namespace `x`;
/// - `name.kind.namespace`: as written;
/// - anything else is matched as written, and so names nothing that Istio
///   would find.
pub fn candidates(reference: &str, kind: &str, namespace: &str) -> Vec<String> {
    let parts: Vec<&str> = reference.split('.').collect();
    match parts.as_slice() {
        [name] => vec![full_name(name, kind, namespace)],
        [name, x] => vec![full_name(name, x, namespace), full_name(name, kind, x)],
        _ => vec![reference.to_string()],
    }
}

/// Resolves `reference` against the full names `known` holds: the first
/// candidate found.
pub fn resolve<'a, T>(
    reference: &str,
    kind: &str,
    namespace: &str,
    known: impl Fn(&str) -> Option<&'a T>,
) -> Option<(String, &'a T)> {
    candidates(reference, kind, namespace)
        .into_iter()
        .find_map(|c| known(&c).map(|found| (c, found)))
}

/// Whether a quota asked for in a Check (`quotas` of a `CheckRequest`,
/// from a QuotaSpec) is the instance named `short_name`: Mixer compares the
/// instance's own name, ignoring case.
pub fn asks_for(requested: &str, short_name: &str) -> bool {
    requested.eq_ignore_ascii_case(short_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_expand_as_istio_does() {
        assert_eq!(
            candidates("deny", HANDLER, "ns"),
            ["deny.handler.ns"],
            "a short name is in the rule's namespace"
        );
        assert_eq!(
            candidates("deny.denier", HANDLER, "ns"),
            ["deny.denier.ns", "deny.handler.denier"],
            "kind first, then namespace"
        );
        assert_eq!(
            candidates("deny.other", HANDLER, "ns"),
            ["deny.other.ns", "deny.handler.other"]
        );
        assert_eq!(
            candidates("deny.handler.other", HANDLER, "ns"),
            ["deny.handler.other"],
            "a full name is taken as written, even from another namespace"
        );
        assert_eq!(candidates("a.b.c.d", INSTANCE, "ns"), ["a.b.c.d"]);
    }

    #[test]
    fn resolution_takes_the_first_known_candidate() {
        let known = std::collections::BTreeMap::from([
            ("deny.handler.ns".to_string(), 1),
            ("deny.handler.handler".to_string(), 2),
        ]);
        let lookup = |name: &str| known.get(name);
        assert_eq!(
            resolve("deny.handler", HANDLER, "ns", lookup),
            Some(("deny.handler.ns".to_string(), &1)),
            "`denyall.handler` is the handler in the rule's namespace"
        );
        assert_eq!(
            resolve("deny.handler.ns", HANDLER, "other", lookup),
            Some(("deny.handler.ns".to_string(), &1))
        );
        assert_eq!(resolve("deny", HANDLER, "other", lookup), None);
    }

    #[test]
    fn quotas_are_asked_for_by_short_name_in_any_case() {
        assert!(asks_for("RequestCount", "requestcount"));
        assert!(!asks_for("requestcount.instance.ns", "requestcount"));
    }
}
