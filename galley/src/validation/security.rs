//! `authentication.istio.io` policies and `rbac.istio.io` roles, bindings
//! and configs.

use mesh_api::pb::istio::{authentication::v1alpha1 as authn, rbac::v1alpha1 as rbac};

use super::Check;

pub(super) fn authentication_policy(c: &mut Check, s: &str, p: &authn::Policy) {
    for (i, target) in p.targets.iter().enumerate() {
        c.require(
            !target.name.is_empty(),
            format!("{s}.targets[{i}].name"),
            "a target needs a service name",
        );
    }
    for (i, peer) in p.peers.iter().enumerate() {
        if let Some(authn::peer_authentication_method::Params::Jwt(jwt)) = &peer.params {
            jwt_rule(c, &format!("{s}.peers[{i}].jwt"), jwt);
            // Served, it would admit peers without the check it asks for.
            c.fail(
                format!("{s}.peers[{i}].jwt"),
                "peer authentication by JWT is not enforced by this mesh yet; \
                 the policy is refused rather than served unenforced",
            );
        }
    }
    if p.peer_is_optional {
        c.ignored(
            format!("{s}.peerIsOptional"),
            "this mesh requires the peer authentication the policy names: \
             peers are never optional",
        );
    }
    for (i, origin) in p.origins.iter().enumerate() {
        match &origin.jwt {
            Some(jwt) => jwt_rule(c, &format!("{s}.origins[{i}].jwt"), jwt),
            None => c.fail(format!("{s}.origins[{i}].jwt"), "an origin needs a jwt"),
        }
    }
    // Served, it would let requests in without the end-user check it asks
    // for: refused until the proxy enforces JWTs.
    if !p.origins.is_empty() {
        c.fail(
            format!("{s}.origins"),
            "end-user (JWT) authentication is not enforced by this mesh yet; \
             the policy is refused rather than served unenforced",
        );
    }
}

pub(super) fn jwt_rule(c: &mut Check, f: &str, jwt: &authn::Jwt) {
    c.require(
        !jwt.issuer.is_empty(),
        format!("{f}.issuer"),
        "a JWT rule needs an issuer",
    );
    if !jwt.jwks_uri.is_empty() {
        let ok = jwt.jwks_uri.starts_with("http://") || jwt.jwks_uri.starts_with("https://");
        c.require(ok, format!("{f}.jwksUri"), "jwksUri must be an http(s) URL");
    }
}

pub(super) fn service_role(c: &mut Check, s: &str, r: &rbac::ServiceRole) {
    if r.rules.is_empty() {
        c.fail(
            format!("{s}.rules"),
            "a service role needs at least one rule",
        );
    }
    for (i, rule) in r.rules.iter().enumerate() {
        c.require(
            !rule.services.is_empty(),
            format!("{s}.rules[{i}].services"),
            "a rule needs at least one service",
        );
        for (k, constraint) in rule.constraints.iter().enumerate() {
            c.require(
                !constraint.key.is_empty(),
                format!("{s}.rules[{i}].constraints[{k}].key"),
                "a constraint needs a key",
            );
            c.require(
                !constraint.values.is_empty(),
                format!("{s}.rules[{i}].constraints[{k}].values"),
                "a constraint needs values",
            );
        }
    }
}

pub(super) fn service_role_binding(c: &mut Check, s: &str, b: &rbac::ServiceRoleBinding) {
    if b.subjects.is_empty() {
        c.fail(
            format!("{s}.subjects"),
            "a binding needs at least one subject",
        );
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
            format!("{s}.subjects[{i}]"),
            "a subject needs a user, group, property or name",
        );
    }
    match &b.role_ref {
        Some(r) => {
            c.require(
                r.kind == "ServiceRole",
                format!("{s}.roleRef.kind"),
                "roleRef.kind must be ServiceRole",
            );
            c.require(
                !r.name.is_empty(),
                format!("{s}.roleRef.name"),
                "roleRef needs a name",
            );
        }
        None => c.fail(format!("{s}.roleRef"), "a binding needs a roleRef"),
    }
}

pub(super) fn rbac_config(c: &mut Check, s: &str, r: &rbac::RbacConfig) {
    use rbac::rbac_config::Mode;
    let mode = Mode::try_from(r.mode).unwrap_or(Mode::Off);
    c.require(
        mode == Mode::OnWithInclusion || r.inclusion.is_none(),
        format!("{s}.inclusion"),
        "inclusion is only for mode ON_WITH_INCLUSION",
    );
    c.require(
        mode == Mode::OnWithExclusion || r.exclusion.is_none(),
        format!("{s}.exclusion"),
        "exclusion is only for mode ON_WITH_EXCLUSION",
    );
}
