//! Inbound security of a workload port: its mTLS mode from the
//! authentication policies (Policy, MeshPolicy), and its RBAC rules from
//! ServiceRoles and ServiceRoleBindings when the RbacConfig enables RBAC for
//! the service.
//!
//! Policy precedence is Istio 1.1's: a policy of the service's namespace
//! naming the service and the port, then one naming the service, then the
//! namespace's `default` policy without targets, then the MeshPolicy.

use envoy_types::pb::envoy::{
    config::{
        core::v3::CidrRange,
        rbac::v3::{
            Permission, Policy as RbacPolicy, Principal, Rbac, permission, principal, rbac,
        },
        route::v3::{HeaderMatcher, RouteMatch, header_matcher, route_match},
    },
    extensions::filters::{
        http::{
            jwt_authn::v3::{JwtAuthentication, JwtRequirement},
            rbac::v3::Rbac as RbacFilter,
        },
        network::rbac::v3::Rbac as RbacNetworkFilter,
    },
    r#type::matcher::v3::{PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher},
};
use mesh_api::pb::istio::{
    authentication::v1alpha1::{
        self as authn, Policy, mutual_tls, peer_authentication_method, port_selector,
    },
    rbac::v1alpha1::{
        AccessRule, EnforcementMode, RbacConfig, ServiceRole, ServiceRoleBinding, Subject,
        rbac_config,
    },
};

use crate::model::{Model, Named, Port, Service};

pub const RBAC_HTTP_FILTER: &str = "envoy.filters.http.rbac";
pub const RBAC_NETWORK_FILTER: &str = "envoy.filters.network.rbac";

/// What an inbound port accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mtls {
    /// Plaintext only (no peer authentication).
    Off,
    /// Mesh mTLS only.
    Strict,
    /// Mesh mTLS or plaintext.
    Permissive,
}

/// The short name of a Kubernetes-style host (`reviews` of
/// `reviews.shop.svc.cluster.local`), else the host.
fn short_name(host: &str) -> &str {
    if host.contains(".svc.") {
        host.split('.').next().unwrap_or(host)
    } else {
        host
    }
}

/// The policy that applies to `port` of `service`, with its name as Istio
/// 1.1's debug pages give it (`name/namespace`; the MeshPolicy's is
/// `default/`).
pub fn policy_for<'a>(
    model: &'a Model,
    service: &Service,
    port: &Port,
) -> Option<(String, &'a Policy)> {
    let name = short_name(&service.host);
    let in_namespace = || {
        model
            .config
            .policies
            .iter()
            .filter(|p| p.namespace == service.namespace)
    };
    let port_matches =
        |selector: &mesh_api::pb::istio::authentication::v1alpha1::PortSelector| match &selector
            .port
        {
            Some(port_selector::Port::Number(n)) => *n == port.number,
            Some(port_selector::Port::Name(n)) => *n == port.name,
            None => false,
        };
    let targeted = |with_port: bool| {
        in_namespace().find(|p| {
            p.spec.targets.iter().any(|t| {
                (t.name == name || t.name == service.host)
                    && if with_port {
                        t.ports.iter().any(port_matches)
                    } else {
                        t.ports.is_empty()
                    }
            })
        })
    };
    targeted(true)
        .or_else(|| targeted(false))
        .or_else(|| in_namespace().find(|p| p.name == "default" && p.spec.targets.is_empty()))
        .map(|p| (format!("{}/{}", p.name, p.namespace), &p.spec))
        .or_else(|| Some(("default/".into(), model.config.mesh_policy.as_ref()?)))
}

/// The mTLS mode of an inbound port.
pub fn inbound_mtls(model: &Model, service: &Service, port: &Port) -> Mtls {
    let Some((_, policy)) = policy_for(model, service, port) else {
        return Mtls::Off;
    };
    let mtls = policy.peers.iter().find_map(|p| match &p.params {
        Some(peer_authentication_method::Params::Mtls(m)) => Some(m),
        _ => None,
    });
    match mtls {
        None => Mtls::Off,
        Some(m) if m.mode == mutual_tls::Mode::Permissive as i32 || m.allow_tls => Mtls::Permissive,
        Some(_) => Mtls::Strict,
    }
}

/// Whether the RbacConfig turns RBAC on for `service`.
pub fn rbac_enabled(config: &RbacConfig, service: &Service) -> bool {
    let listed = |target: Option<&rbac_config::Target>| {
        target.is_some_and(|t| {
            t.namespaces.contains(&service.namespace)
                || t.services.iter().any(|s| s == &service.host)
        })
    };
    match rbac_config::Mode::try_from(config.mode) {
        Ok(rbac_config::Mode::On) => true,
        Ok(rbac_config::Mode::OnWithInclusion) => listed(config.inclusion.as_ref()),
        Ok(rbac_config::Mode::OnWithExclusion) => !listed(config.exclusion.as_ref()),
        _ => false,
    }
}

/// `*`, `prefix*` and `*suffix` globs, as RBAC values are written.
fn glob(value: &str) -> StringMatcher {
    let pattern = if value == "*" {
        string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: ".*".into(),
            ..Default::default()
        })
    } else if let Some(suffix) = value.strip_prefix('*') {
        string_matcher::MatchPattern::Suffix(suffix.into())
    } else if let Some(prefix) = value.strip_suffix('*') {
        string_matcher::MatchPattern::Prefix(prefix.into())
    } else {
        string_matcher::MatchPattern::Exact(value.into())
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    }
}

fn glob_matches(value: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| {
        p == "*"
            || p.strip_prefix('*').is_some_and(|s| value.ends_with(s))
            || p.strip_suffix('*').is_some_and(|s| value.starts_with(s))
            || p == value
    })
}

fn header_rule(name: &str, value: &str) -> HeaderMatcher {
    HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(glob(
            value,
        ))),
        ..Default::default()
    }
}

fn any_of<T>(items: Vec<T>, or: impl Fn(Vec<T>) -> T) -> Option<T> {
    match items.len() {
        0 => None,
        1 => items.into_iter().next(),
        _ => Some(or(items)),
    }
}

fn or_permissions(ps: Vec<Permission>) -> Permission {
    Permission {
        rule: Some(permission::Rule::OrRules(permission::Set { rules: ps })),
    }
}

fn not(p: Permission) -> Permission {
    Permission {
        rule: Some(permission::Rule::NotRule(Box::new(p))),
    }
}

/// A ServiceRole rule as an Envoy permission: every listed dimension must
/// match (paths, methods, hosts, ports, their negations, and header
/// constraints); `None` when the rule needs HTTP and the port is TCP.
fn permission_of(rule: &AccessRule, http: bool) -> Option<Permission> {
    let http_only = !rule.paths.is_empty()
        || !rule.methods.is_empty()
        || !rule.hosts.is_empty()
        || !rule.not_paths.is_empty()
        || !rule.not_methods.is_empty()
        || !rule.not_hosts.is_empty()
        || rule
            .constraints
            .iter()
            .any(|c| c.key.starts_with("request."));
    if http_only && !http {
        return None;
    }
    let path = |p: &String| Permission {
        rule: Some(permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(glob(p))),
        })),
    };
    let header = |name: &'static str| {
        move |v: &String| Permission {
            rule: Some(permission::Rule::Header(header_rule(name, v))),
        }
    };
    let port = |p: &i32| Permission {
        rule: Some(permission::Rule::DestinationPort(*p as u32)),
    };
    let mut all: Vec<Permission> = Vec::new();
    all.extend(any_of(
        rule.paths.iter().map(path).collect(),
        or_permissions,
    ));
    all.extend(any_of(
        rule.methods.iter().map(header(":method")).collect(),
        or_permissions,
    ));
    all.extend(any_of(
        rule.hosts.iter().map(header(":authority")).collect(),
        or_permissions,
    ));
    all.extend(any_of(
        rule.ports.iter().map(port).collect(),
        or_permissions,
    ));
    all.extend(any_of(rule.not_paths.iter().map(path).collect(), or_permissions).map(not));
    all.extend(
        any_of(
            rule.not_methods.iter().map(header(":method")).collect(),
            or_permissions,
        )
        .map(not),
    );
    all.extend(
        any_of(
            rule.not_hosts.iter().map(header(":authority")).collect(),
            or_permissions,
        )
        .map(not),
    );
    all.extend(any_of(rule.not_ports.iter().map(port).collect(), or_permissions).map(not));
    for c in &rule.constraints {
        if let Some(name) = c
            .key
            .strip_prefix("request.headers[")
            .and_then(|k| k.strip_suffix(']'))
        {
            let values = c.values.iter().map(|v| Permission {
                rule: Some(permission::Rule::Header(header_rule(name, v))),
            });
            all.extend(any_of(values.collect(), or_permissions));
        } else if c.key == "destination.port" {
            let ports = c
                .values
                .iter()
                .filter_map(|v| v.parse::<u32>().ok())
                .map(|p| Permission {
                    rule: Some(permission::Rule::DestinationPort(p)),
                });
            all.extend(any_of(ports.collect(), or_permissions));
        }
    }
    Some(match all.len() {
        0 => Permission {
            rule: Some(permission::Rule::Any(true)),
        },
        1 => all.remove(0),
        _ => Permission {
            rule: Some(permission::Rule::AndRules(permission::Set { rules: all })),
        },
    })
}

/// A principal of what the end user's token proved, as Istio 1.1's RBAC
/// reads it from the `istio_authn` metadata.
fn end_user(path: &[&str], value: &str) -> Principal {
    use envoy_types::pb::envoy::{
        config::rbac::v3::SourcedMetadata,
        r#type::matcher::v3::{
            MetadataMatcher, ValueMatcher,
            metadata_matcher::{PathSegment, path_segment::Segment},
            value_matcher,
        },
    };
    Principal {
        identifier: Some(principal::Identifier::SourcedMetadata(SourcedMetadata {
            metadata_matcher: Some(MetadataMatcher {
                filter: "istio_authn".into(),
                path: path
                    .iter()
                    .map(|k| PathSegment {
                        segment: Some(Segment::Key(k.to_string())),
                    })
                    .collect(),
                value: Some(ValueMatcher {
                    match_pattern: Some(value_matcher::MatchPattern::StringMatch(glob(value))),
                }),
                invert: false,
            }),
            metadata_source: 0,
        })),
    }
}

fn principal_name(value: &str) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(glob(value)),
            },
        )),
    }
}

fn cidr(value: &str) -> Option<CidrRange> {
    let (ip, len) = match value.split_once('/') {
        Some((ip, len)) => (ip, len.parse().ok()?),
        None => (value, if value.contains(':') { 128 } else { 32 }),
    };
    ip.parse::<std::net::IpAddr>().ok()?;
    Some(CidrRange {
        address_prefix: ip.into(),
        prefix_len: Some(envoy_types::pb::google::protobuf::UInt32Value { value: len }),
    })
}

/// A binding subject as an Envoy principal: a user is a peer identity
/// (`cluster.local/ns/x/sa/y`, matched with its `spiffe://` scheme), `*`
/// anyone; properties add source IP, namespace and request headers.
/// What a binding's subject grants to, as RBAC principals; `None` when it
/// names what this mesh cannot check (so it grants nothing, rather than
/// more than it says). `origin`: the policy binds the end user as the
/// principal (USE_ORIGIN), so `user` is the token's principal.
fn principal_of(subject: &Subject, http: bool, origin: bool) -> Option<Principal> {
    let mut all = Vec::new();
    match subject.user.as_str() {
        "" => {}
        "*" => all.push(Principal {
            identifier: Some(principal::Identifier::Any(true)),
        }),
        user if origin => all.push(end_user(&["request.auth.principal"], user)),
        user => all.push(principal_name(&format!("spiffe://{user}"))),
    }
    for (key, value) in &subject.properties {
        match key.as_str() {
            "source.principal" | "source.user" => {
                all.push(principal_name(&format!("spiffe://{value}")));
            }
            "source.namespace" => all.push(Principal {
                identifier: Some(principal::Identifier::Authenticated(
                    principal::Authenticated {
                        principal_name: Some(StringMatcher {
                            match_pattern: Some(string_matcher::MatchPattern::SafeRegex(
                                RegexMatcher {
                                    regex: format!(".*/ns/{}/.*", value.replace('*', ".*")),
                                    ..Default::default()
                                },
                            )),
                            ..Default::default()
                        }),
                    },
                )),
            }),
            "source.ip" => all.push(Principal {
                identifier: Some(principal::Identifier::DirectRemoteIp(cidr(value)?)),
            }),
            k if k.starts_with("request.headers[") => {
                if !http {
                    return None;
                }
                let name = k
                    .trim_start_matches("request.headers[")
                    .trim_end_matches(']');
                all.push(Principal {
                    identifier: Some(principal::Identifier::Header(header_rule(name, value))),
                });
            }
            k
            @ ("request.auth.principal" | "request.auth.audiences" | "request.auth.presenter") => {
                if !http {
                    return None;
                }
                all.push(end_user(&[k], value));
            }
            k if k.starts_with("request.auth.claims[") => {
                if !http {
                    return None;
                }
                let claim = k
                    .trim_start_matches("request.auth.claims[")
                    .trim_end_matches(']');
                all.push(end_user(&["request.auth.claims", claim], value));
            }
            other => {
                tracing::warn!(
                    property = other,
                    "a binding's subject names what RBAC cannot check: it grants nothing"
                );
                return None;
            }
        }
    }
    Some(match all.len() {
        0 => return None,
        1 => all.remove(0),
        _ => Principal {
            identifier: Some(principal::Identifier::AndIds(principal::Set { ids: all })),
        },
    })
}

/// The RBAC rules for `service`, `None` when RBAC is off for it: per
/// ServiceRole of its namespace with rules naming it, the permissions of
/// those rules, granted to the subjects of the role's bindings.
fn rules_for(model: &Model, service: &Service, http: bool) -> Option<(Rbac, bool)> {
    let config = model.config.rbac_config.as_ref()?;
    if !rbac_enabled(config, service) {
        return None;
    }
    let shadow = config.enforcement_mode == EnforcementMode::Permissive as i32;
    // USE_ORIGIN: a binding's `user` is the end user, not the peer.
    let origin = service
        .ports
        .first()
        .and_then(|port| policy_for(model, service, port))
        .is_some_and(|(_, p)| p.principal_binding == authn::PrincipalBinding::UseOrigin as i32);
    let mut rbac = Rbac {
        action: rbac::Action::Allow as i32,
        ..Default::default()
    };
    for named in model.config.service_roles.iter() {
        let (ns, role, spec) = (&named.namespace, &named.name, &named.spec);
        if *ns != service.namespace {
            continue;
        }
        let permissions: Vec<Permission> = rules_naming(spec, service)
            .filter_map(|r| permission_of(r, http))
            .collect();
        if permissions.is_empty() {
            continue;
        }
        let principals: Vec<Principal> = bindings_of(model, ns, role)
            .flat_map(|b| b.spec.subjects.iter())
            .filter_map(|s| principal_of(s, http, origin))
            .collect();
        if principals.is_empty() {
            continue;
        }
        rbac.policies.insert(
            role.clone(),
            RbacPolicy {
                permissions,
                principals,
                ..Default::default()
            },
        );
    }
    Some((rbac, shadow))
}

/// The rules of a ServiceRole that name `service` (by host or short
/// name, globs allowed).
pub fn rules_naming<'a>(
    role: &'a ServiceRole,
    service: &'a Service,
) -> impl Iterator<Item = &'a AccessRule> {
    role.rules.iter().filter(|r| {
        glob_matches(&service.host, &r.services)
            || glob_matches(short_name(&service.host), &r.services)
    })
}

/// The ServiceRoleBindings of `namespace` that bind the role `role`.
pub fn bindings_of<'a>(
    model: &'a Model,
    namespace: &'a str,
    role: &'a str,
) -> impl Iterator<Item = &'a Named<ServiceRoleBinding>> {
    model.config.service_role_bindings.iter().filter(move |b| {
        b.namespace == namespace && b.spec.role_ref.as_ref().is_some_and(|r| r.name == role)
    })
}

/// The RBAC HTTP filter of an inbound HTTP port.
pub fn rbac_http(model: &Model, service: &Service) -> Option<RbacFilter> {
    let (rules, shadow) = rules_for(model, service, true)?;
    Some(if shadow {
        RbacFilter {
            shadow_rules: Some(rules),
            ..Default::default()
        }
    } else {
        RbacFilter {
            rules: Some(rules),
            ..Default::default()
        }
    })
}

/// The RBAC network filter of an inbound TCP port (HTTP-only rules and
/// subjects left out).
pub fn rbac_tcp(model: &Model, service: &Service, stat_prefix: &str) -> Option<RbacNetworkFilter> {
    let (rules, shadow) = rules_for(model, service, false)?;
    let mut filter = RbacNetworkFilter {
        stat_prefix: stat_prefix.to_string(),
        ..Default::default()
    };
    if shadow {
        filter.shadow_rules = Some(rules);
    } else {
        filter.rules = Some(rules);
    }
    Some(filter)
}

pub const JWT_FILTER: &str = "envoy.filters.http.jwt_authn";

/// Envoy's JWT filter for the end-user authentication (`origins`) of the
/// policy of `port` of `service`: a provider per origin, its keys inline
/// (a `jwksUri`'s as Pilot fetched them; none yet: no token verifies, so
/// requests are refused rather than let in), and rules from the trigger
/// rules: excluded paths first, needing nothing; then included paths,
/// needing their origins; then everything else, needing any origin without
/// included paths.
pub fn jwt_authn(model: &Model, service: &Service, port: &Port) -> Option<JwtAuthentication> {
    use envoy_types::pb::envoy::{
        config::core::v3::{DataSource, data_source},
        extensions::filters::http::jwt_authn::v3::{
            JwtHeader, JwtProvider, JwtRequirementOrList, RequirementRule,
            jwt_provider::JwksSourceSpecifier, jwt_requirement::RequiresType,
            requirement_rule::RequirementType,
        },
    };
    let (_, policy) = policy_for(model, service, port)?;
    let jwts: Vec<&authn::Jwt> = policy
        .origins
        .iter()
        .filter_map(|o| o.jwt.as_ref())
        .collect();
    if jwts.is_empty() {
        return None;
    }
    let name = |i: usize| format!("origin-{i}");
    let mut providers = std::collections::HashMap::new();
    for (i, jwt) in jwts.iter().enumerate() {
        let keys = model
            .jwks
            .get(&jwt.jwks_uri)
            .cloned()
            .unwrap_or_else(|| r#"{"keys":[]}"#.to_string());
        providers.insert(
            name(i),
            JwtProvider {
                issuer: jwt.issuer.clone(),
                audiences: jwt.audiences.clone(),
                from_headers: jwt
                    .jwt_headers
                    .iter()
                    .map(|h| JwtHeader {
                        name: h.clone(),
                        value_prefix: if h.eq_ignore_ascii_case("authorization") {
                            "Bearer ".into()
                        } else {
                            String::new()
                        },
                    })
                    .collect(),
                from_params: jwt.jwt_params.clone(),
                jwks_source_specifier: Some(JwksSourceSpecifier::LocalJwks(DataSource {
                    specifier: Some(data_source::Specifier::InlineString(keys)),
                    ..Default::default()
                })),
                ..Default::default()
            },
        );
    }
    let requires = |origins: Vec<usize>| {
        let one = |i: usize| JwtRequirement {
            requires_type: Some(RequiresType::ProviderName(name(i))),
        };
        let mut list: Vec<JwtRequirement> = origins.into_iter().map(one).collect();
        let required = match list.len() {
            1 => list.remove(0),
            _ => JwtRequirement {
                requires_type: Some(RequiresType::RequiresAny(JwtRequirementOrList {
                    requirements: list,
                })),
            },
        };
        match policy.origin_is_optional {
            // An optional origin: a token is checked when present.
            true => JwtRequirement {
                requires_type: Some(RequiresType::AllowMissing(Default::default())),
            },
            false => required,
        }
    };
    let rule =
        |path: route_match::PathSpecifier, requirement: Option<JwtRequirement>| RequirementRule {
            r#match: Some(RouteMatch {
                path_specifier: Some(path),
                ..Default::default()
            }),
            requirement_type: requirement.map(RequirementType::Requires),
        };
    let mut rules = Vec::new();
    for jwt in &jwts {
        for path in jwt.trigger_rules.iter().flat_map(|t| &t.excluded_paths) {
            rules.extend(path_of(path).map(|p| rule(p, None)));
        }
    }
    let mut everywhere = Vec::new();
    for (i, jwt) in jwts.iter().enumerate() {
        let included: Vec<_> = jwt
            .trigger_rules
            .iter()
            .flat_map(|t| &t.included_paths)
            .collect();
        if included.is_empty() {
            everywhere.push(i);
        }
        for path in included {
            rules.extend(path_of(path).map(|p| rule(p, Some(requires(vec![i])))));
        }
    }
    if !everywhere.is_empty() {
        rules.push(rule(
            route_match::PathSpecifier::Prefix("/".into()),
            Some(requires(everywhere)),
        ));
    }
    Some(JwtAuthentication {
        providers,
        rules,
        ..Default::default()
    })
}

/// A trigger rule's path as a route's path match.
fn path_of(m: &authn::StringMatch) -> Option<route_match::PathSpecifier> {
    use authn::string_match::MatchType;
    use route_match::PathSpecifier;
    let regex = |r: String| {
        PathSpecifier::SafeRegex(RegexMatcher {
            regex: r,
            ..Default::default()
        })
    };
    Some(match m.match_type.as_ref()? {
        MatchType::Exact(p) => PathSpecifier::Path(p.clone()),
        MatchType::Prefix(p) => PathSpecifier::Prefix(p.clone()),
        MatchType::Suffix(s) => regex(format!(".*{}", regex_escape(s))),
        MatchType::Regex(r) => regex(r.clone()),
    })
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}
