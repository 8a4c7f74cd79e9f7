//! End-user authentication as the proxy runs it, from Envoy's
//! `envoy.filters.http.jwt_authn` config: providers (an issuer, the
//! audiences it may name, where the token is found, and its keys), and
//! rules that say, by path, which providers a request needs. The keys are
//! inline (`local_jwks`): Pilot fetches a provider's `jwksUri` and sends
//! the keys, as Istio 1.1's Pilot does, so no proxy reaches out to an
//! identity provider.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::{
    config::core::v3::data_source::Specifier,
    extensions::filters::http::jwt_authn::v3::{
        JwtAuthentication, JwtProvider, JwtRequirement, jwt_provider::JwksSourceSpecifier,
        jwt_requirement::RequiresType, requirement_rule::RequirementType,
    },
};
use jsonwebtoken::jwk::JwkSet;

use super::{Problem, route::RouteMatch};

/// The HTTP filter's name.
pub const JWT_FILTER: &str = "envoy.filters.http.jwt_authn";

/// What a verified token says of the end user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndUser {
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
    /// The authorized presenter (`azp`).
    pub presenter: Option<String>,
    /// The claims whose values are strings.
    pub claims: BTreeMap<String, String>,
}

impl EndUser {
    /// Istio's `request.auth.principal`: `<iss>/<sub>`.
    pub fn principal(&self) -> String {
        format!("{}/{}", self.issuer, self.subject)
    }
}

#[derive(Debug)]
pub struct JwtAuthn {
    pub providers: BTreeMap<String, Provider>,
    /// The first rule whose match holds says what a request needs; none:
    /// nothing.
    pub rules: Vec<(RouteMatch, Requirement)>,
}

#[derive(Debug)]
pub struct Provider {
    pub issuer: String,
    /// Accepted `aud` values; empty accepts any.
    pub audiences: Vec<String>,
    pub keys: JwkSet,
    /// Where the token is: headers (with a value prefix) and query
    /// parameters; by default `Authorization: Bearer` and `access_token`.
    pub from_headers: Vec<(String, String)>,
    pub from_params: Vec<String>,
    /// Keep the token on the request to the app (else it is removed).
    pub forward: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Provider(String),
    Any(Vec<Requirement>),
    All(Vec<Requirement>),
    /// A missing token passes; an invalid one fails.
    AllowMissing,
    /// Tokens are verified, and the request passes whatever the outcome.
    AllowMissingOrFailed,
}

impl JwtAuthn {
    pub fn compile(c: &JwtAuthentication) -> Result<Self, Problem> {
        let mut providers = BTreeMap::new();
        for (name, p) in &c.providers {
            let provider = Provider::compile(p)
                .map_err(|Problem(why)| Problem(format!("JWT provider {name:?}: {why}")))?;
            providers.insert(name.clone(), provider);
        }
        let mut rules = Vec::new();
        for (i, rule) in c.rules.iter().enumerate() {
            let at = |why: String| Problem(format!("JWT rule {i}: {why}"));
            let matcher = rule
                .r#match
                .as_ref()
                .ok_or_else(|| at("no match".into()))
                .and_then(|m| RouteMatch::compile(m).map_err(|Problem(p)| at(p)))?;
            let requirement = match &rule.requirement_type {
                Some(RequirementType::Requires(r)) => {
                    Requirement::compile(r, &providers).map_err(|Problem(p)| at(p))?
                }
                // No requirement: the rule turns verification off.
                None => Requirement::AllowMissingOrFailed,
                Some(other) => return Err(at(format!("{other:?} is not supported"))),
            };
            rules.push((matcher, requirement));
        }
        if c.filter_state_rules.is_some() || !c.requirement_map.is_empty() {
            return Err(Problem(
                "JWT filter state rules and requirement maps are not supported".into(),
            ));
        }
        Ok(Self { providers, rules })
    }
}

impl Provider {
    fn compile(p: &JwtProvider) -> Result<Self, Problem> {
        // Unchecked, any of these would let in tokens the provider means
        // to refuse, or drop what it means to pass on: refused, not ignored.
        let unsupported = [
            ("require_expiration", p.require_expiration),
            ("max_lifetime", p.max_lifetime.is_some()),
            ("subjects", p.subjects.is_some()),
            ("from_cookies", !p.from_cookies.is_empty()),
            (
                "forward_payload_header",
                !p.forward_payload_header.is_empty(),
            ),
            ("claim_to_headers", !p.claim_to_headers.is_empty()),
            ("clock_skew_seconds", p.clock_skew_seconds != 0),
        ];
        if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(Problem(format!("{field} is not supported")));
        }
        let keys = match &p.jwks_source_specifier {
            Some(JwksSourceSpecifier::LocalJwks(source)) => {
                let text = match &source.specifier {
                    Some(Specifier::InlineString(s)) => s.clone(),
                    Some(Specifier::InlineBytes(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => return Err(Problem("the keys must be inline".into())),
                };
                serde_json::from_str::<JwkSet>(&text)
                    .map_err(|e| Problem(format!("the keys are not a JWKS: {e}")))?
            }
            Some(JwksSourceSpecifier::RemoteJwks(_)) => {
                return Err(Problem(
                    "remote JWKS is not fetched by the proxy: Pilot sends the keys inline".into(),
                ));
            }
            None => return Err(Problem("no keys".into())),
        };
        Ok(Self {
            issuer: p.issuer.clone(),
            audiences: p.audiences.clone(),
            keys,
            from_headers: p
                .from_headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value_prefix.clone()))
                .collect(),
            from_params: p.from_params.clone(),
            forward: p.forward,
        })
    }
}

impl Requirement {
    fn compile(
        r: &JwtRequirement,
        providers: &BTreeMap<String, Provider>,
    ) -> Result<Self, Problem> {
        let all = |list: &[JwtRequirement]| {
            list.iter()
                .map(|r| Self::compile(r, providers))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(match &r.requires_type {
            Some(RequiresType::ProviderName(name)) => {
                if !providers.contains_key(name) {
                    return Err(Problem(format!("no JWT provider {name:?}")));
                }
                Self::Provider(name.clone())
            }
            Some(RequiresType::RequiresAny(list)) => Self::Any(all(&list.requirements)?),
            Some(RequiresType::RequiresAll(list)) => Self::All(all(&list.requirements)?),
            Some(RequiresType::AllowMissing(_)) => Self::AllowMissing,
            Some(RequiresType::AllowMissingOrFailed(_)) => Self::AllowMissingOrFailed,
            other => {
                return Err(Problem(format!(
                    "JWT requirement {other:?} is not supported"
                )));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_setting_the_proxy_cannot_honour_is_refused() {
        let provider = JwtProvider {
            issuer: "https://id.example.com".into(),
            require_expiration: true,
            ..Default::default()
        };
        let config = JwtAuthentication {
            providers: [("origin".to_string(), provider)].into(),
            ..Default::default()
        };
        let Err(Problem(why)) = JwtAuthn::compile(&config) else {
            panic!("compiled");
        };
        assert!(why.contains("require_expiration is not supported"), "{why}");
    }
}
