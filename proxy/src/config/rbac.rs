//! RBAC policies, as Envoy's RBAC filters carry them (Pilot builds them
//! from ServiceRoles and bindings): each policy grants its permissions
//! (paths, methods and other headers, ports) to its principals (peer
//! identities, source addresses, headers). With an ALLOW action a request
//! passes when some policy matches it; with DENY, when none does. Shadow
//! rules are evaluated and logged only.

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::{
    config::{
        core::v3::CidrRange,
        rbac::v3::{self as xds, permission::Rule, principal::Identifier, rbac::Action},
    },
    r#type::matcher::v3::path_matcher,
};

use super::{
    Problem,
    jwt::EndUser,
    route::{HeaderMatch, RequestParts, StringMatch},
};

#[derive(Debug)]
pub struct Rbac {
    allow: bool,
    policies: Vec<(String, Policy)>,
}

/// Rules enforced, and rules only logged.
#[derive(Debug, Default)]
pub struct RbacFilter {
    pub rules: Option<Rbac>,
    pub shadow: Option<Rbac>,
}

#[derive(Debug)]
struct Policy {
    permissions: Vec<Permission>,
    principals: Vec<Principal>,
}

#[derive(Debug)]
enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    Header(HeaderMatch),
    Path(StringMatch),
    DestinationPort(u16),
    DestinationIp(Cidr),
}

#[derive(Debug)]
enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// A peer that proved an identity (matching, when given).
    Authenticated(Option<StringMatch>),
    SourceIp(Cidr),
    Header(HeaderMatch),
    Path(StringMatch),
    /// What the end user's token proved, as Istio's `istio_authn` metadata
    /// names it: `request.auth.principal`, `.audiences`, `.presenter`, or
    /// `request.auth.claims` and a claim.
    EndUser {
        path: Vec<String>,
        value: StringMatch,
    },
}

/// The metadata namespace Istio's RBAC reads the end user from.
const AUTHN_METADATA: &str = "istio_authn";

#[derive(Debug)]
struct Cidr {
    network: IpAddr,
    len: u8,
}

impl Cidr {
    fn compile(c: &CidrRange) -> Result<Self, Problem> {
        let network: IpAddr = c
            .address_prefix
            .parse()
            .map_err(|_| Problem(format!("{:?} is not an IP address", c.address_prefix)))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let len = c.prefix_len.as_ref().map_or(max, |l| l.value.min(max));
        Ok(Cidr {
            network,
            len: len as u8,
        })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> u128 {
            match ip {
                IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
                IpAddr::V6(v6) => u128::from(v6),
            }
        };
        if self.network.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let len = if ip.is_ipv4() {
            self.len
        } else {
            self.len.min(128)
        };
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(len))
        };
        bits(self.network) & mask == bits(ip) & mask
    }
}

/// What a decision looks at. `request` is absent for TCP connections, so
/// rules on HTTP attributes do not match them.
pub struct Subject<'a> {
    pub request: Option<&'a RequestParts<'a>>,
    /// The end user a token proved (the JWT stage), if any.
    pub end_user: Option<&'a EndUser>,
    /// The peer's proven SPIFFE identity, `spiffe://...`.
    pub peer_identity: Option<&'a str>,
    pub peer: SocketAddr,
    pub destination: Option<SocketAddr>,
}

impl RbacFilter {
    pub fn compile(rules: Option<&xds::Rbac>, shadow: Option<&xds::Rbac>) -> Result<Self, Problem> {
        Ok(RbacFilter {
            rules: rules.map(Rbac::compile).transpose()?,
            shadow: shadow.map(Rbac::compile).transpose()?,
        })
    }

    /// Whether the subject may proceed; the shadow verdict is logged.
    pub fn allows(&self, subject: &Subject) -> bool {
        if let Some(shadow) = &self.shadow {
            let (allowed, policy) = shadow.decide(subject);
            tracing::debug!(allowed, ?policy, "RBAC shadow rules");
        }
        self.rules.as_ref().is_none_or(|r| r.decide(subject).0)
    }
}

impl Rbac {
    fn compile(r: &xds::Rbac) -> Result<Self, Problem> {
        let allow = match Action::try_from(r.action) {
            Ok(Action::Allow) => true,
            Ok(Action::Deny) => false,
            _ => {
                return Err(Problem(format!(
                    "RBAC action {} is not supported",
                    r.action
                )));
            }
        };
        let mut policies = Vec::new();
        for (name, p) in &r.policies {
            let at = |Problem(e): Problem| Problem(format!("RBAC policy {name:?}: {e}"));
            let permissions = p
                .permissions
                .iter()
                .map(Permission::compile)
                .collect::<Result<_, _>>()
                .map_err(at)?;
            let principals = p
                .principals
                .iter()
                .map(Principal::compile)
                .collect::<Result<_, _>>()
                .map_err(at)?;
            policies.push((
                name.clone(),
                Policy {
                    permissions,
                    principals,
                },
            ));
        }
        policies.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Rbac { allow, policies })
    }

    /// The verdict, and the policy that matched.
    fn decide(&self, subject: &Subject) -> (bool, Option<&str>) {
        let matched = self.policies.iter().find(|(_, p)| {
            p.permissions.iter().any(|perm| perm.matches(subject))
                && p.principals.iter().any(|pr| pr.matches(subject))
        });
        let name = matched.map(|(n, _)| n.as_str());
        (matched.is_some() == self.allow, name)
    }
}

fn path_of(
    m: &envoy_types::pb::envoy::r#type::matcher::v3::PathMatcher,
) -> Result<StringMatch, Problem> {
    match &m.rule {
        Some(path_matcher::Rule::Path(s)) => StringMatch::compile(s),
        None => Err(Problem("path matcher without a rule".into())),
    }
}

impl Permission {
    fn compile(p: &xds::Permission) -> Result<Self, Problem> {
        let all = |rules: &[xds::Permission]| {
            rules
                .iter()
                .map(Permission::compile)
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(match &p.rule {
            Some(Rule::Any(true)) => Permission::Any,
            Some(Rule::AndRules(set)) => Permission::And(all(&set.rules)?),
            Some(Rule::OrRules(set)) => Permission::Or(all(&set.rules)?),
            Some(Rule::NotRule(inner)) => Permission::Not(Box::new(Permission::compile(inner)?)),
            Some(Rule::Header(h)) => Permission::Header(HeaderMatch::compile(h)?),
            Some(Rule::UrlPath(m)) => Permission::Path(path_of(m)?),
            Some(Rule::DestinationPort(port)) => Permission::DestinationPort(
                u16::try_from(*port)
                    .map_err(|_| Problem(format!("port {port} is out of range")))?,
            ),
            Some(Rule::DestinationIp(c)) => Permission::DestinationIp(Cidr::compile(c)?),
            other => return Err(Problem(format!("permission {other:?} is not supported"))),
        })
    }

    fn matches(&self, s: &Subject) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(all) => all.iter().all(|p| p.matches(s)),
            Permission::Or(any) => any.iter().any(|p| p.matches(s)),
            Permission::Not(p) => !p.matches(s),
            Permission::Header(h) => s.request.is_some_and(|r| h.holds(r)),
            Permission::Path(m) => s
                .request
                .is_some_and(|r| m.matches(r.path.split('?').next().unwrap_or(""))),
            Permission::DestinationPort(port) => s.destination.is_some_and(|d| d.port() == *port),
            Permission::DestinationIp(c) => s.destination.is_some_and(|d| c.contains(d.ip())),
        }
    }
}

impl Principal {
    fn compile(p: &xds::Principal) -> Result<Self, Problem> {
        let all = |ids: &[xds::Principal]| {
            ids.iter()
                .map(Principal::compile)
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(match &p.identifier {
            Some(Identifier::Any(true)) => Principal::Any,
            Some(Identifier::AndIds(set)) => Principal::And(all(&set.ids)?),
            Some(Identifier::OrIds(set)) => Principal::Or(all(&set.ids)?),
            Some(Identifier::NotId(inner)) => Principal::Not(Box::new(Principal::compile(inner)?)),
            Some(Identifier::Authenticated(a)) => Principal::Authenticated(
                a.principal_name
                    .as_ref()
                    .map(StringMatch::compile)
                    .transpose()?,
            ),
            Some(Identifier::DirectRemoteIp(c) | Identifier::RemoteIp(c)) => {
                Principal::SourceIp(Cidr::compile(c)?)
            }
            Some(Identifier::Header(h)) => Principal::Header(HeaderMatch::compile(h)?),
            Some(Identifier::UrlPath(m)) => Principal::Path(path_of(m)?),
            Some(Identifier::SourcedMetadata(sourced)) => {
                use envoy_types::pb::envoy::r#type::matcher::v3::value_matcher::MatchPattern;
                let default = Default::default();
                let m = sourced.metadata_matcher.as_ref().unwrap_or(&default);
                if m.filter != AUTHN_METADATA || sourced.metadata_source != 0 {
                    return Err(Problem(format!(
                        "principal metadata of {:?} (source {}) is not supported \
                         ({AUTHN_METADATA:?}, dynamic, is)",
                        m.filter, sourced.metadata_source
                    )));
                }
                let value = match m.value.as_ref().and_then(|v| v.match_pattern.as_ref()) {
                    Some(MatchPattern::StringMatch(s)) => StringMatch::compile(s)?,
                    other => {
                        return Err(Problem(format!(
                            "principal metadata value {other:?} is not supported (strings are)"
                        )));
                    }
                };
                use envoy_types::pb::envoy::r#type::matcher::v3::metadata_matcher::path_segment::Segment;
                let path = m
                    .path
                    .iter()
                    .filter_map(|p| p.segment.as_ref().map(|Segment::Key(k)| k.clone()))
                    .collect();
                let end_user = Principal::EndUser { path, value };
                if m.invert {
                    Principal::Not(Box::new(end_user))
                } else {
                    end_user
                }
            }
            other => return Err(Problem(format!("principal {other:?} is not supported"))),
        })
    }

    fn matches(&self, s: &Subject) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(all) => all.iter().all(|p| p.matches(s)),
            Principal::Or(any) => any.iter().any(|p| p.matches(s)),
            Principal::Not(p) => !p.matches(s),
            Principal::Authenticated(name) => match (s.peer_identity, name) {
                (Some(_), None) => true,
                (Some(id), Some(m)) => m.matches(id),
                (None, _) => false,
            },
            Principal::SourceIp(c) => c.contains(s.peer.ip()),
            Principal::Header(h) => s.request.is_some_and(|r| h.holds(r)),
            Principal::Path(m) => s
                .request
                .is_some_and(|r| m.matches(r.path.split('?').next().unwrap_or(""))),
            Principal::EndUser { path, value } => {
                let Some(user) = s.end_user else {
                    return false;
                };
                let keys: Vec<&str> = path.iter().map(String::as_str).collect();
                match keys[..] {
                    ["request.auth.principal"] => value.matches(&user.principal()),
                    ["request.auth.audiences"] => user.audiences.iter().any(|a| value.matches(a)),
                    ["request.auth.presenter"] => {
                        user.presenter.as_deref().is_some_and(|p| value.matches(p))
                    }
                    ["request.auth.claims", claim] => {
                        user.claims.get(claim).is_some_and(|c| value.matches(c))
                    }
                    _ => false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::{
        config::rbac::v3::{Permission as XP, Policy as XPolicy, Principal as XPr, principal},
        r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern},
    };

    fn exact(s: &str) -> StringMatcher {
        StringMatcher {
            match_pattern: Some(MatchPattern::Exact(s.into())),
            ..Default::default()
        }
    }

    /// GETs on /ratings for productpage only.
    fn policy() -> RbacFilter {
        let method = XP {
            rule: Some(Rule::Header(envoy_types::pb::envoy::config::route::v3::HeaderMatcher {
                name: ":method".into(),
                header_match_specifier: Some(
                    envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier::StringMatch(exact("GET")),
                ),
                ..Default::default()
            })),
        };
        let path = XP {
            rule: Some(Rule::UrlPath(
                envoy_types::pb::envoy::r#type::matcher::v3::PathMatcher {
                    rule: Some(path_matcher::Rule::Path(StringMatcher {
                        match_pattern: Some(MatchPattern::Prefix("/ratings".into())),
                        ..Default::default()
                    })),
                },
            )),
        };
        let productpage = XPr {
            identifier: Some(Identifier::Authenticated(principal::Authenticated {
                principal_name: Some(exact("spiffe://cluster.local/ns/shop/sa/productpage")),
            })),
        };
        let rules = xds::Rbac {
            action: Action::Allow as i32,
            policies: [(
                "reader".to_string(),
                XPolicy {
                    permissions: vec![XP {
                        rule: Some(Rule::AndRules(xds::permission::Set {
                            rules: vec![method, path],
                        })),
                    }],
                    principals: vec![productpage],
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        RbacFilter::compile(Some(&rules), None).unwrap()
    }

    #[test]
    fn allow_policies_grant_their_permissions_to_their_principals_only() {
        let filter = policy();
        let headers = http::HeaderMap::new();
        let request = |method, path| RequestParts {
            authority: "ratings",
            path,
            method,
            scheme: "http",
            headers: &headers,
        };
        let decide = |r: &RequestParts, who: Option<&str>| {
            filter.allows(&Subject {
                request: Some(r),
                end_user: None,
                peer_identity: who,
                peer: "10.0.0.1:5000".parse().unwrap(),
                destination: None,
            })
        };
        let productpage = Some("spiffe://cluster.local/ns/shop/sa/productpage");
        assert!(decide(&request("GET", "/ratings/1?x=y"), productpage));
        assert!(!decide(&request("POST", "/ratings/1"), productpage));
        assert!(!decide(&request("GET", "/reviews"), productpage));
        assert!(!decide(
            &request("GET", "/ratings/1"),
            Some("spiffe://cluster.local/ns/shop/sa/other")
        ));
        assert!(
            !decide(&request("GET", "/ratings/1"), None),
            "plaintext proves no one"
        );
    }

    #[test]
    fn cidrs_contain_what_their_prefix_covers() {
        let c = Cidr::compile(&CidrRange {
            address_prefix: "10.1.0.0".into(),
            prefix_len: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 16 }),
        })
        .unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
    }

    #[test]
    fn end_user_principals_read_what_the_token_proved() {
        use envoy_types::pb::envoy::{
            config::rbac::v3::SourcedMetadata,
            r#type::matcher::v3::{
                MetadataMatcher, ValueMatcher, metadata_matcher::PathSegment,
                metadata_matcher::path_segment::Segment, value_matcher,
            },
        };
        let metadata = |path: &[&str], value: &str| XPr {
            identifier: Some(Identifier::SourcedMetadata(SourcedMetadata {
                metadata_matcher: Some(MetadataMatcher {
                    filter: "istio_authn".into(),
                    path: path
                        .iter()
                        .map(|k| PathSegment {
                            segment: Some(Segment::Key(k.to_string())),
                        })
                        .collect(),
                    value: Some(ValueMatcher {
                        match_pattern: Some(value_matcher::MatchPattern::StringMatch(exact(value))),
                    }),
                    invert: false,
                }),
                metadata_source: 0,
            })),
        };
        let rules = xds::Rbac {
            action: Action::Allow as i32,
            policies: [(
                "reviewers".to_string(),
                XPolicy {
                    permissions: vec![XP {
                        rule: Some(Rule::Any(true)),
                    }],
                    principals: vec![XPr {
                        identifier: Some(Identifier::AndIds(xds::principal::Set {
                            ids: vec![
                                metadata(&["request.auth.principal"], "https://id.example/jason"),
                                metadata(&["request.auth.claims", "group"], "reviewers"),
                            ],
                        })),
                    }],
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        let filter = RbacFilter::compile(Some(&rules), None).unwrap();
        let user = |group: &str| EndUser {
            issuer: "https://id.example".into(),
            subject: "jason".into(),
            audiences: Vec::new(),
            presenter: None,
            claims: [("group".to_string(), group.to_string())].into(),
        };
        let decide = |end_user: Option<&EndUser>| {
            filter.allows(&Subject {
                request: None,
                end_user,
                peer_identity: None,
                peer: "10.0.0.1:5000".parse().unwrap(),
                destination: None,
            })
        };
        assert!(decide(Some(&user("reviewers"))));
        assert!(!decide(Some(&user("readers"))));
        assert!(!decide(None), "no token, no end user");
    }
}
