//! `authentication.istio.io` policies and `rbac.istio.io` roles, bindings
//! and configs.

use mesh_api::pb::istio::{authentication::v1alpha1 as authn, rbac::v1alpha1 as rbac};

use super::{Check, Field};

pub(super) fn authentication_policy(c: &mut Check, s: &Field, p: &authn::Policy) {
    for (i, target) in p.targets.iter().enumerate() {
        c.require(
            !target.name.is_empty(),
            s.at("targets").index(i).at("name"),
            "a target needs a service name",
        );
    }
    for (i, peer) in p.peers.iter().enumerate() {
        if let Some(authn::peer_authentication_method::Params::Jwt(jwt)) = &peer.params {
            jwt_rule(c, &s.at("peers").index(i).at("jwt"), jwt);
            // Served, it would admit peers without the check it asks for.
            c.fail(
                s.at("peers").index(i).at("jwt"),
                "peer authentication by JWT is not enforced by this mesh yet; \
                 the policy is refused rather than served unenforced",
            );
        }
    }
    if p.peer_is_optional {
        c.ignored(
            s.at("peerIsOptional"),
            "this mesh requires the peer authentication the policy names: \
             peers are never optional",
        );
    }
    for (i, origin) in p.origins.iter().enumerate() {
        match &origin.jwt {
            Some(jwt) => jwt_rule(c, &s.at("origins").index(i).at("jwt"), jwt),
            None => c.fail(s.at("origins").index(i).at("jwt"), "an origin needs a jwt"),
        }
    }
}

pub(super) fn jwt_rule(c: &mut Check, f: &Field, jwt: &authn::Jwt) {
    c.require(
        !jwt.issuer.is_empty(),
        f.at("issuer"),
        "a JWT rule needs an issuer",
    );
    if !jwt.jwks_uri.is_empty() {
        let ok = jwt.jwks_uri.starts_with("http://") || jwt.jwks_uri.starts_with("https://");
        c.require(ok, f.at("jwksUri"), "jwksUri must be an http(s) URL");
    }
}

pub(super) fn service_role(c: &mut Check, s: &Field, r: &rbac::ServiceRole) {
    if r.rules.is_empty() {
        c.fail(s.at("rules"), "a service role needs at least one rule");
    }
    for (i, rule) in r.rules.iter().enumerate() {
        c.require(
            !rule.services.is_empty(),
            s.at("rules").index(i).at("services"),
            "a rule needs at least one service",
        );
        for (k, constraint) in rule.constraints.iter().enumerate() {
            c.require(
                !constraint.key.is_empty(),
                s.at("rules").index(i).at("constraints").index(k).at("key"),
                "a constraint needs a key",
            );
            c.require(
                !constraint.values.is_empty(),
                s.at("rules")
                    .index(i)
                    .at("constraints")
                    .index(k)
                    .at("values"),
                "a constraint needs values",
            );
        }
    }
}

pub(super) fn service_role_binding(c: &mut Check, s: &Field, b: &rbac::ServiceRoleBinding) {
    if b.subjects.is_empty() {
        c.fail(s.at("subjects"), "a binding needs at least one subject");
    }
    for (i, subject) in b.subjects.iter().enumerate() {
        #[allow(deprecated)]
        let empty = subject.user.is_empty()
            && subject.group.is_empty()
            && subject.properties.is_empty()
            && subject.names.is_empty()
            && subject.not_names.is_empty()
            && subject.groups.is_empty()
            && subject.not_groups.is_empty()
            && subject.namespaces.is_empty()
            && subject.not_namespaces.is_empty()
            && subject.ips.is_empty()
            && subject.not_ips.is_empty();
        c.require(
            !empty,
            s.at("subjects").index(i),
            "a subject needs a user, group, property or name",
        );
        for key in subject.properties.keys() {
            let known = matches!(
                key.as_str(),
                "source.principal"
                    | "source.user"
                    | "source.namespace"
                    | "source.ip"
                    | "request.auth.principal"
                    | "request.auth.audiences"
                    | "request.auth.presenter"
            ) || (key.starts_with("request.headers[")
                || key.starts_with("request.auth.claims["))
                && key.ends_with(']');
            // Unchecked, it would grant more than the binding says.
            c.require(
                known,
                s.at("subjects").index(i).at("properties").key(key),
                "this mesh's RBAC cannot check this property",
            );
        }
    }
    match &b.role_ref {
        Some(r) => {
            c.require(
                r.kind == "ServiceRole",
                s.at("roleRef").at("kind"),
                "roleRef.kind must be ServiceRole",
            );
            c.require(
                !r.name.is_empty(),
                s.at("roleRef").at("name"),
                "roleRef needs a name",
            );
        }
        None => c.fail(s.at("roleRef"), "a binding needs a roleRef"),
    }
}

pub(super) fn rbac_config(c: &mut Check, s: &Field, r: &rbac::RbacConfig) {
    use rbac::rbac_config::Mode;
    let mode = Mode::try_from(r.mode).unwrap_or(Mode::Off);
    c.require(
        mode == Mode::OnWithInclusion || r.inclusion.is_none(),
        s.at("inclusion"),
        "inclusion is only for mode ON_WITH_INCLUSION",
    );
    c.require(
        mode == Mode::OnWithExclusion || r.exclusion.is_none(),
        s.at("exclusion"),
        "exclusion is only for mode ON_WITH_EXCLUSION",
    );
}
