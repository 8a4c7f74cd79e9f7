//! Host names as Istio config writes them: short names resolved against the
//! config's namespace, and `*.suffix` wildcards.

/// The DNS suffix of in-mesh services.
pub const DOMAIN_SUFFIX: &str = "cluster.local";

/// A config host made fully qualified: a name without dots is a service of
/// the config's namespace (`reviews` -> `reviews.shop.svc.cluster.local`).
pub fn resolve(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.starts_with('*') || namespace.is_empty() {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.{DOMAIN_SUFFIX}")
    }
}

/// The suffix of Istio 1.1's names for services in other clusters
/// (`<name>.<namespace>.global`), reached through their cluster's gateway.
pub const GLOBAL_SUFFIX: &str = ".global";

/// The name other clusters know a Kubernetes service of this cluster by:
/// `reviews.shop.svc.cluster.local` -> `reviews.shop.global`; `None` for
/// any other host.
pub fn global_name(host: &str) -> Option<String> {
    let name_ns = host.strip_suffix(&format!(".svc.{DOMAIN_SUFFIX}"))?;
    let (name, ns) = name_ns.split_once('.')?;
    (!ns.contains('.')).then(|| format!("{name}.{ns}{GLOBAL_SUFFIX}"))
}

/// Whether `pattern` (a host or a `*`/`*.suffix` wildcard) covers `host`.
/// A wildcard host is covered by an equal or wider wildcard.
pub fn covers(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        None => pattern == host,
        Some(suffix) => match host.strip_prefix('*') {
            Some(host_suffix) => host_suffix.ends_with(suffix),
            None => host.ends_with(suffix),
        },
    }
}

/// Whether two hosts (either may be a wildcard) have a name in common.
pub fn intersects(a: &str, b: &str) -> bool {
    covers(a, b) || covers(b, a)
}

/// How specific a pattern is, for picking the closest of several matches:
/// an exact host beats any wildcard, a longer suffix a shorter one.
pub fn specificity(pattern: &str) -> (bool, usize) {
    (!pattern.starts_with('*'), pattern.len())
}

/// The names a proxy in `namespace` may use for `host` on `port`, as HTTP
/// `:authority` values: the host, its short forms for a Kubernetes service
/// (`name` only from its own namespace, `name.ns`, `name.ns.svc`), each bare
/// and with the port.
pub fn domains(host: &str, port: u32, namespace: &str) -> Vec<String> {
    let mut names = vec![host.to_string()];
    let svc_suffix = format!(".svc.{DOMAIN_SUFFIX}");
    if let Some(name_ns) = host.strip_suffix(&svc_suffix)
        && let Some((name, ns)) = name_ns.split_once('.')
    {
        names.push(format!("{name_ns}.svc"));
        names.push(name_ns.to_string());
        if ns == namespace {
            names.push(name.to_string());
        }
    }
    names
        .into_iter()
        .flat_map(|n| [format!("{n}:{port}"), n])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_resolve_in_the_config_namespace() {
        assert_eq!(resolve("reviews", "shop"), "reviews.shop.svc.cluster.local");
        assert_eq!(resolve("api.example.com", "shop"), "api.example.com");
        assert_eq!(resolve("*.example.com", "shop"), "*.example.com");
    }

    #[test]
    fn a_kubernetes_service_has_a_global_name() {
        assert_eq!(
            global_name("reviews.shop.svc.cluster.local").as_deref(),
            Some("reviews.shop.global")
        );
        assert_eq!(global_name("api.example.com"), None);
        assert_eq!(global_name("reviews.shop.global"), None);
        assert_eq!(global_name("a.b.c.svc.cluster.local"), None);
    }

    #[test]
    fn wildcards_cover_suffixes() {
        assert!(covers("*", "a.b"));
        assert!(covers("*.example.com", "api.example.com"));
        assert!(!covers("*.example.com", "example.org"));
        assert!(covers("*.com", "*.example.com"));
        assert!(!covers("*.example.com", "*.com"));
        assert!(intersects("*.example.com", "*.com"));
        assert!(specificity("a.example.com") > specificity("*.example.com"));
    }

    #[test]
    fn domains_include_short_forms_only_where_they_resolve() {
        let same = domains("reviews.shop.svc.cluster.local", 9080, "shop");
        assert!(same.contains(&"reviews".to_string()));
        assert!(same.contains(&"reviews:9080".to_string()));
        assert!(same.contains(&"reviews.shop:9080".to_string()));
        let other = domains("reviews.shop.svc.cluster.local", 9080, "web");
        assert!(!other.contains(&"reviews".to_string()));
        assert!(other.contains(&"reviews.shop".to_string()));
        assert_eq!(
            domains("api.example.com", 443, "web"),
            ["api.example.com:443", "api.example.com"]
        );
    }
}
