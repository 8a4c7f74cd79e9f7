//! The JWT stage (when the chain has Envoy's `jwt_authn` filter): end-user
//! authentication. The first rule whose match holds says which providers'
//! tokens a request needs; a request without them, or with a token that
//! does not verify (signature by the provider's keys, issuer, audience,
//! expiry), is answered 401 with the reason and goes no further. A
//! verified token's claims travel on as [`EndUser`], for Mixer's
//! `request.auth.*` attributes.

use std::sync::Arc;

use http::{HeaderValue, StatusCode, header};
use jsonwebtoken::{DecodingKey, Validation, errors::ErrorKind};
use tower::{Layer, Service};

use super::{Request, Stage};
pub use crate::config::jwt::EndUser;
use crate::config::{
    jwt::{JwtAuthn, Provider, Requirement},
    route::RequestParts,
};

#[derive(Clone)]
pub struct Jwt<S> {
    authn: Option<Arc<JwtAuthn>>,
    inner: S,
}

/// End-user authentication by `authn`; none: requests pass as they are.
pub fn layer<S>(authn: Option<Arc<JwtAuthn>>) -> impl Layer<S, Service = Jwt<S>> + Clone {
    tower::layer::layer_fn(move |inner| Jwt {
        authn: authn.clone(),
        inner,
    })
}

impl<S: Stage<std::convert::Infallible>> Service<Request> for Jwt<S> {
    super::stage_service!(std::convert::Infallible);

    fn call(&mut self, mut request: Request) -> Self::Future {
        let Some(authn) = &self.authn else {
            return self.inner.call(request);
        };
        let parts = RequestParts::of(&request);
        let Some((_, requirement)) = authn.rules.iter().find(|(m, _)| m.matches(&parts)) else {
            return self.inner.call(request);
        };
        match check(authn, requirement, &request) {
            Ok(user) => {
                for provider in authn.providers.values().filter(|p| !p.forward) {
                    for (name, _) in headers(provider) {
                        request.headers_mut().remove(name);
                    }
                }
                if let Some(user) = user {
                    request.extensions_mut().insert(user);
                }
                self.inner.call(request)
            }
            Err(why) => {
                let mut refused = super::local_reply(StatusCode::UNAUTHORIZED, &why);
                refused.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"mesh\""),
                );
                super::reply(refused)
            }
        }
    }
}

/// Whether `requirement` holds for `request`: the end user a token
/// proved, if any, or why it does not hold.
fn check(
    authn: &JwtAuthn,
    requirement: &Requirement,
    request: &Request,
) -> Result<Option<EndUser>, String> {
    match requirement {
        Requirement::Provider(name) => {
            let provider = &authn.providers[name];
            let token = token(provider, request).ok_or("Jwt is missing")?;
            verify(provider, &token).map(Some)
        }
        Requirement::Any(list) => {
            let mut first = None;
            for r in list {
                match check(authn, r, request) {
                    Ok(user) => return Ok(user),
                    Err(why) => {
                        first.get_or_insert(why);
                    }
                }
            }
            Err(first.unwrap_or_else(|| "Jwt is missing".into()))
        }
        Requirement::All(list) => {
            let mut user = None;
            for r in list {
                user = user.or(check(authn, r, request)?);
            }
            Ok(user)
        }
        Requirement::AllowMissing | Requirement::AllowMissingOrFailed => {
            let mut failed = None;
            for provider in authn.providers.values() {
                let Some(token) = token(provider, request) else {
                    continue;
                };
                match verify(provider, &token) {
                    Ok(user) => return Ok(Some(user)),
                    Err(why) => failed = Some(why),
                }
            }
            match (failed, requirement) {
                (Some(why), Requirement::AllowMissing) => Err(why),
                _ => Ok(None),
            }
        }
    }
}

/// The headers a provider reads its token from, with their prefixes:
/// `Authorization: Bearer` unless it names others.
fn headers(provider: &Provider) -> Vec<(&str, &str)> {
    if provider.from_headers.is_empty() && provider.from_params.is_empty() {
        return vec![("authorization", "Bearer ")];
    }
    provider
        .from_headers
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_str()))
        .collect()
}

/// The provider's token on `request`: from its headers, else its query
/// parameters (`access_token` unless it names others).
fn token(provider: &Provider, request: &Request) -> Option<String> {
    for (name, prefix) in headers(provider) {
        if let Some(value) = request.headers().get(name).and_then(|v| v.to_str().ok())
            && let Some(token) = value.strip_prefix(prefix)
        {
            return Some(token.trim().to_string());
        }
    }
    let default = ["access_token".to_string()];
    let params = match (&provider.from_headers[..], &provider.from_params[..]) {
        ([], []) => &default[..],
        (_, params) => params,
    };
    let query = request.uri().query()?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        params.iter().any(|p| p == k).then(|| v.to_string())
    })
}

/// The end user `token` proves to `provider`, or why it does not.
fn verify(provider: &Provider, token: &str) -> Result<EndUser, String> {
    let failed = || "Jwt verification fails".to_string();
    let header = jsonwebtoken::decode_header(token).map_err(|_| failed())?;
    let keys = provider
        .keys
        .keys
        .iter()
        .filter(|k| header.kid.is_none() || k.common.key_id == header.kid);
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[&provider.issuer]);
    validation.required_spec_claims.clear();
    validation.required_spec_claims.insert("iss".into());
    match provider.audiences.is_empty() {
        true => validation.validate_aud = false,
        false => validation.set_audience(&provider.audiences),
    }
    let mut why = failed();
    for jwk in keys {
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &validation,
        ) {
            Ok(data) => return Ok(end_user(&data.claims)),
            Err(e) => {
                why = match e.kind() {
                    ErrorKind::ExpiredSignature => "Jwt is expired".into(),
                    ErrorKind::ImmatureSignature => "Jwt is not yet valid".into(),
                    ErrorKind::InvalidIssuer => "Jwt issuer is not configured".into(),
                    ErrorKind::InvalidAudience => "Audiences in Jwt are not allowed".into(),
                    _ => failed(),
                };
                // A key that checked the signature settles it.
                if !matches!(e.kind(), ErrorKind::InvalidSignature) {
                    return Err(why);
                }
            }
        }
    }
    Err(why)
}

fn end_user(claims: &serde_json::Map<String, serde_json::Value>) -> EndUser {
    let text = |name: &str| {
        claims
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let audiences = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.clone()],
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    EndUser {
        issuer: text("iss").unwrap_or_default(),
        subject: text("sub").unwrap_or_default(),
        audiences,
        presenter: text("azp"),
        claims: claims
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use envoy_types::pb::envoy::{
        config::{
            core::v3::{DataSource, data_source},
            route::v3::{RouteMatch, route_match::PathSpecifier},
        },
        extensions::filters::http::jwt_authn::v3::{
            JwtAuthentication, JwtHeader, JwtProvider, JwtRequirement, RequirementRule,
            jwt_provider::JwksSourceSpecifier, jwt_requirement::RequiresType,
            requirement_rule::RequirementType,
        },
    };
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::json;
    use tower::ServiceExt;

    use super::*;
    use crate::http::test_support::{Recorder, request, text};

    const ISSUER: &str = "https://id.example.com";

    /// A signing key, and its public half as a JWKS.
    fn key(kid: &str) -> (EncodingKey, String) {
        let pair = rcgen::KeyPair::generate().unwrap();
        let point = pair.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
            "x": b64(&point[1..33]), "y": b64(&point[33..65])}]});
        (
            EncodingKey::from_ec_der(&pair.serialize_der()),
            jwks.to_string(),
        )
    }

    fn token(key: &EncodingKey, claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// Tokens of `ISSUER` for audience `bookinfo`, needed under `/api`, from
    /// `Authorization` or `x-jwt` (prefix `Token `).
    fn authn(jwks: &str, from_headers: Vec<JwtHeader>) -> Arc<JwtAuthn> {
        let provider = JwtProvider {
            issuer: ISSUER.into(),
            audiences: vec!["bookinfo".into()],
            from_headers,
            jwks_source_specifier: Some(JwksSourceSpecifier::LocalJwks(DataSource {
                specifier: Some(data_source::Specifier::InlineString(jwks.into())),
                ..Default::default()
            })),
            ..Default::default()
        };
        let rule = RequirementRule {
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/api".into())),
                ..Default::default()
            }),
            requirement_type: Some(RequirementType::Requires(JwtRequirement {
                requires_type: Some(RequiresType::ProviderName("origin".into())),
            })),
        };
        let config = JwtAuthentication {
            providers: [("origin".to_string(), provider)].into(),
            rules: vec![rule],
            ..Default::default()
        };
        Arc::new(JwtAuthn::compile(&config).unwrap())
    }

    async fn send(authn: &Arc<JwtAuthn>, request: Request) -> (StatusCode, String, Recorder) {
        let app = Recorder::default();
        let stage = layer(Some(authn.clone())).layer(app.answering("app"));
        let response = stage.oneshot(request).await.unwrap();
        let status = response.status();
        (status, text(response).await, app)
    }

    fn bearer(uri: &str, token: &str) -> Request {
        let mut r = request(uri);
        let value = format!("Bearer {token}").parse().unwrap();
        r.headers_mut().insert(header::AUTHORIZATION, value);
        r
    }

    #[tokio::test]
    async fn a_valid_token_lets_the_request_through_with_its_end_user() {
        let (signing, jwks) = key("k1");
        let authn = authn(&jwks, Vec::new());
        let claims = json!({"iss": ISSUER, "sub": "jason", "aud": ["bookinfo"],
            "azp": "web", "group": "reviewers", "exp": now() + 600});
        let (status, _, app) = send(&authn, bearer("/api/reviews", &token(&signing, claims))).await;
        assert_eq!(status, StatusCode::OK);
        let seen = app.last();
        let user = seen.extensions.get::<EndUser>().unwrap();
        assert_eq!(user.principal(), "https://id.example.com/jason");
        assert_eq!(user.audiences, ["bookinfo"]);
        assert_eq!(user.presenter.as_deref(), Some("web"));
        assert_eq!(user.claims["group"], "reviewers");
        // Not forwarded: the app does not see the token.
        assert!(!seen.headers.contains_key(header::AUTHORIZATION));
    }

    #[tokio::test]
    async fn a_missing_or_bad_token_is_refused_with_the_reason() {
        let (signing, jwks) = key("k1");
        let (other, _) = key("k1");
        let authn = authn(&jwks, Vec::new());
        let claims = |iss: &str, aud: &str, exp: u64| json!({"iss": iss, "sub": "jason", "aud": aud, "exp": exp});
        let cases = [
            (request("/api/reviews"), "Jwt is missing"),
            (
                bearer(
                    "/api/reviews",
                    &token(&signing, claims(ISSUER, "bookinfo", now() - 3600)),
                ),
                "Jwt is expired",
            ),
            (
                bearer(
                    "/api/reviews",
                    &token(
                        &signing,
                        claims("https://evil.example", "bookinfo", now() + 600),
                    ),
                ),
                "Jwt issuer is not configured",
            ),
            (
                bearer(
                    "/api/reviews",
                    &token(&signing, claims(ISSUER, "billing", now() + 600)),
                ),
                "Audiences in Jwt are not allowed",
            ),
            (
                bearer(
                    "/api/reviews",
                    &token(&other, claims(ISSUER, "bookinfo", now() + 600)),
                ),
                "Jwt verification fails",
            ),
            (
                bearer("/api/reviews", "not.a.token"),
                "Jwt verification fails",
            ),
        ];
        for (request, reason) in cases {
            let (status, body, app) = send(&authn, request).await;
            assert_eq!((status, body.trim()), (StatusCode::UNAUTHORIZED, reason));
            assert_eq!(app.count(), 0, "{reason}");
        }
    }

    #[tokio::test]
    async fn only_the_paths_the_rules_name_need_a_token_found_where_the_provider_says() {
        let (signing, jwks) = key("k1");
        let good = token(
            &signing,
            json!({"iss": ISSUER, "sub": "jason", "aud": "bookinfo"}),
        );
        let by_default = authn(&jwks, Vec::new());
        let (status, _, _) = send(&by_default, request("/health")).await;
        assert_eq!(status, StatusCode::OK, "no rule for /health");
        let in_query = request(&format!("/api/reviews?access_token={good}"));
        let (status, _, _) = send(&by_default, in_query).await;
        assert_eq!(status, StatusCode::OK);

        let custom = JwtHeader {
            name: "x-jwt".into(),
            value_prefix: "Token ".into(),
        };
        let by_header = authn(&jwks, vec![custom]);
        let mut r = request("/api/reviews");
        r.headers_mut()
            .insert("x-jwt", format!("Token {good}").parse().unwrap());
        let (status, _, _) = send(&by_header, r).await;
        assert_eq!(status, StatusCode::OK);
        let (status, body, _) = send(&by_header, bearer("/api/reviews", &good)).await;
        assert_eq!(
            (status, body.trim()),
            (StatusCode::UNAUTHORIZED, "Jwt is missing")
        );
    }
}
