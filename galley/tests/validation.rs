//! Semantic validation, kind by kind: realistic documents pass, and each
//! broken one is refused with the field path and the reason.

use galley::validation::{validate, validate_all};
use mesh_api::object::ConfigObject;

fn objects(text: &str) -> Vec<ConfigObject> {
    ConfigObject::parse_yaml(text, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
}

/// The errors found (what keeps an object from being served).
fn problems(text: &str) -> Vec<String> {
    found(text, true)
}

/// The warnings found (what is served but not honoured).
fn warnings(text: &str) -> Vec<String> {
    found(text, false)
}

fn found(text: &str, errors: bool) -> Vec<String> {
    let objects = objects(text);
    let refs: Vec<&ConfigObject> = objects.iter().collect();
    validate_all(&refs)
        .into_values()
        .flatten()
        .filter(|p| p.is_error() == errors)
        .map(|p| p.to_string())
        .collect()
}

#[test]
fn the_realistic_examples_are_valid() {
    for file in [
        "networking.yaml",
        "security.yaml",
        "policy.yaml",
        "mixer.yaml",
    ] {
        let path = format!(
            "{}/../mesh-api/tests/data/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(path).unwrap();
        for object in objects(&text) {
            let found: Vec<_> = validate(&object)
                .into_iter()
                .filter(|p| p.is_error())
                .collect();
            // The policy example refers to handlers and instances defined
            // elsewhere; only each object's own rules apply here.
            assert!(found.is_empty(), "{}: {found:?}", object.location);
        }
    }
}

const VS: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: r, namespace: ns}\nspec:\n";
const DR: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata: {name: d, namespace: ns}\nspec:\n";
const GW: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: Gateway\nmetadata: {name: g, namespace: ns}\nspec:\n";
const SE: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\nmetadata: {name: s, namespace: ns}\nspec:\n";

/// Each case: a spec, and (field, reason) fragments that must be reported.
fn assert_refused(kind_header: &str, spec: &str, expected: &[(&str, &str)]) {
    let found = problems(&format!("{kind_header}{spec}"));
    for (field, reason) in expected {
        assert!(
            found
                .iter()
                .any(|p| p.starts_with(&format!("{field}: ")) && p.contains(reason)),
            "expected {field}: …{reason}… in {found:#?}\nfor {spec}"
        );
    }
}

#[test]
fn virtual_services() {
    assert_refused(
        VS,
        "  http: [{route: [{destination: {host: a}}]}]",
        &[("spec.hosts", "at least one host")],
    );
    assert_refused(
        VS,
        "  hosts: ['*']\n  http: [{route: [{destination: {host: a}}]}]",
        &[("spec.hosts[0]", "wildcard host")],
    );
    assert_refused(
        VS,
        "  hosts: [Bad_Host]\n  http: [{route: [{destination: {host: a}}]}]",
        &[("spec.hosts[0]", "not a valid domain")],
    );
    assert_refused(VS, "  hosts: [a]", &[("spec", "http, tcp or tls")]);
    assert_refused(
        VS,
        "  hosts: [a]\n  http:\n  - route:\n    - {destination: {host: a, subset: v1}, weight: 70}\n    - {destination: {host: a, subset: V2}, weight: 20}\n",
        &[
            ("spec.http[0].route", "add up to 90, not 100"),
            ("spec.http[0].route[1].destination.subset", "DNS-1123"),
        ],
    );
    assert_refused(
        VS,
        "  hosts: [a]\n  http:\n  - match: [{uri: {regex: '(unclosed'}, headers: {'': {exact: x}}}]\n    route: [{destination: {host: a}}]\n    timeout: 0.0001s\n    retries: {attempts: -1, retryOn: 'gateway-error,sometimes'}\n",
        &[
            ("spec.http[0].match[0].uri.regex", "invalid regex"),
            (
                "spec.http[0].match[0].headers",
                "header name cannot be empty",
            ),
            ("spec.http[0].timeout", "at least 1ms"),
            ("spec.http[0].retries.attempts", "negative"),
            (
                "spec.http[0].retries.retryOn",
                "\"sometimes\" is not a retry condition",
            ),
        ],
    );
    // Rust's regex takes the x flag, RE2 (Envoy, and the proxy's whole-
    // value match) does not: refused here, not NACKed by every proxy.
    assert_refused(
        VS,
        "  hosts: [a]\n  http:\n  - match: [{headers: {x-user: {regex: '(?x)admin # or root'}}}]\n    route: [{destination: {host: a}}]\n",
        &[(
            "spec.http[0].match[0].headers[\"x-user\"].regex",
            "the x flag is not RE2 syntax",
        )],
    );
    assert_refused(
        VS,
        "  hosts: [a]\n  http:\n  - redirect: {}\n    route: [{destination: {host: a}}]\n  - route: [{destination: {host: '*'}}]\n    fault: {abort: {httpStatus: 700, percentage: {value: 101}}}\n",
        &[
            ("spec.http[0]", "both route and redirect"),
            ("spec.http[0].redirect", "uri, authority, or both"),
            ("spec.http[1].route[0].destination.host", "wildcard"),
            ("spec.http[1].fault.abort.httpStatus", "200..599"),
            ("spec.http[1].fault.abort.percentage", "0.0001..100"),
        ],
    );
    assert_refused(
        VS,
        "  hosts: [a]\n  gateways: [Bad/Name]\n  tcp: [{route: [{destination: {host: a}}]}]\n",
        &[("spec.gateways[0]", "namespace/name")],
    );
}

#[test]
fn destination_rules() {
    assert_refused(
        DR,
        "  host: reviews\n  subsets: [{name: v1}, {name: v1}]\n  trafficPolicy: {}\n",
        &[
            ("spec.subsets[1].name", "duplicate subset name"),
            ("spec.trafficPolicy", "at least one setting"),
        ],
    );
    assert_refused(
        DR,
        "  host: reviews\n  trafficPolicy:\n    outlierDetection: {maxEjectionPercent: 150, consecutiveErrors: -1}\n    tls: {mode: MUTUAL}\n    loadBalancer: {consistentHash: {httpCookie: {name: user}}}\n    portLevelSettings: [{loadBalancer: {simple: RANDOM}}]\n",
        &[
            (
                "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
                "0..100",
            ),
            (
                "spec.trafficPolicy.outlierDetection.consecutiveErrors",
                "negative",
            ),
            ("spec.trafficPolicy.tls.clientCertificate", "MUTUAL"),
            (
                "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
                "ttl",
            ),
            (
                "spec.trafficPolicy.portLevelSettings[0].port",
                "needs a port",
            ),
        ],
    );
}

#[test]
fn gateways() {
    assert_refused(
        GW,
        "  servers: []\n",
        &[("spec.servers", "at least one server")],
    );
    assert_refused(
        GW,
        "  servers:\n  - {port: {number: 443, name: https, protocol: HTTPS}, hosts: ['*']}\n  - {port: {number: 80, name: https, protocol: GOPHER}, hosts: ['*'], tls: {mode: SIMPLE}}\n  - {port: {number: 8443, name: mtls, protocol: HTTPS}, hosts: ['*'], tls: {mode: MUTUAL, serverCertificate: a, privateKey: b}}\n",
        &[
            ("spec.servers[0].tls", "need TLS settings"),
            ("spec.servers[1].port.name", "unique"),
            ("spec.servers[1].port.protocol", "unknown protocol"),
            ("spec.servers[2].tls.caCertificates", "client CA bundle"),
        ],
    );
}

#[test]
fn service_entries() {
    assert_refused(
        SE,
        "  hosts: [db.example.com]\n  resolution: STATIC\n  ports: [{number: 5432, name: pg, protocol: TCP}, {number: 5432, name: pg, protocol: TCP}]\n",
        &[
            ("spec.endpoints", "STATIC needs endpoints"),
            ("spec.ports[1].name", "used twice"),
            ("spec.ports[1].number", "defined twice"),
        ],
    );
    assert_refused(
        SE,
        "  hosts: [db.example.com]\n  addresses: [10.0.0.0/8]\n  resolution: DNS\n  ports: [{number: 5432, name: pg, protocol: TCP}]\n  endpoints: [{address: db.internal, ports: {postgres: 5432}}]\n",
        &[
            ("spec.addresses[0]", "CIDR addresses"),
            (
                "spec.endpoints[0].ports[\"postgres\"]",
                "no port of that name",
            ),
        ],
    );
    assert_refused(
        SE,
        "  hosts: [db.example.com]\n  resolution: STATIC\n  ports: [{number: 5432, name: pg, protocol: TCP}]\n  endpoints: [{address: not-an-ip}]\n",
        &[("spec.endpoints[0].address", "IP addresses")],
    );
    assert_refused(
        SE,
        "  hosts: [db.example.com]\n  resolution: NONE\n  endpoints: [{address: 1.2.3.4}]\n",
        &[("spec.endpoints", "NONE takes no endpoints")],
    );
}

#[test]
fn security_kinds() {
    let rbac = "apiVersion: rbac.istio.io/v1alpha1\nkind: ServiceRoleBinding\nmetadata: {name: b, namespace: ns}\nspec:\n  subjects: [{}]\n  roleRef: {kind: Role, name: ''}\n";
    let found = problems(rbac);
    assert!(
        found.iter().any(|p| p.starts_with("spec.subjects[0]: ")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|p| p.starts_with("spec.roleRef.kind: ")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|p| p.starts_with("spec.roleRef.name: ")),
        "{found:?}"
    );

    let role = "apiVersion: rbac.istio.io/v1alpha1\nkind: ServiceRole\nmetadata: {name: r, namespace: ns}\nspec: {rules: [{methods: [GET]}]}\n";
    assert!(
        problems(role)
            .iter()
            .any(|p| p.starts_with("spec.rules[0].services: "))
    );

    let config = "apiVersion: rbac.istio.io/v1alpha1\nkind: ClusterRbacConfig\nmetadata: {name: default}\nspec: {mode: 'ON', inclusion: {namespaces: [a]}}\n";
    assert!(
        problems(config)
            .iter()
            .any(|p| p.starts_with("spec.inclusion: "))
    );

    let policy = "apiVersion: authentication.istio.io/v1alpha1\nkind: Policy\nmetadata: {name: p, namespace: ns}\nspec:\n  targets: [{name: ''}]\n  origins: [{jwt: {jwksUri: 'ftp://keys'}}]\n";
    let found = problems(policy);
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("spec.targets[0].name: ")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("spec.origins[0].jwt.issuer: ")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("spec.origins[0].jwt.jwksUri: ")),
        "{found:?}"
    );
}

#[test]
fn mixer_rules_must_name_existing_handlers_and_instances() {
    let config = "\
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: denyhandler, namespace: istio-system}
spec: {compiledAdapter: denier, params: {status: {code: 7}}}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: denyrequest, namespace: istio-system}
spec: {compiledTemplate: checknothing}
---
apiVersion: config.istio.io/v1alpha2
kind: apikey
metadata: {name: legacykey, namespace: istio-system}
spec: {}
---
apiVersion: config.istio.io/v1alpha2
kind: denier
metadata: {name: legacydeny, namespace: istio-system}
spec: {status: {code: 7}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: ok, namespace: istio-system}
spec:
  actions:
  - {handler: denyhandler, instances: [denyrequest]}
  - {handler: denyhandler.istio-system, instances: [denyrequest.istio-system]}
  - {handler: legacydeny.denier, instances: [denyrequest, legacykey.apikey]}
  - {handler: denyhandler.handler, instances: [denyrequest.instance.istio-system]}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: broken, namespace: istio-system}
spec:
  actions:
  - {handler: nosuchhandler, instances: [denyrequest, nosuchinstance]}
";
    let found = problems(config);
    assert_eq!(
        found,
        [
            "spec.actions[0].handler: no handler \"nosuchhandler\" exists",
            "spec.actions[0].instances[1]: no instance \"nosuchinstance\" exists",
        ]
    );
    // A legacy kind of an adapter or template Mixer runs (`denier`) is
    // run; one it does not run (`apikey`) is served with a warning, and so
    // is a reference to it.
    let warned = warnings(config);
    assert_eq!(warned.len(), 2, "{warned:#?}");
    assert!(
        warned[0].starts_with("warning: spec: kind apikey is served for Istio's own Mixer"),
        "{warned:#?}"
    );
    assert!(
        warned[1].starts_with(
            "warning: spec.actions[2].instances[1]: legacykey.apikey.istio-system is of a kind"
        ),
        "{warned:#?}"
    );
}

#[test]
fn retries_can_be_turned_off_with_zero_attempts() {
    let spec = "  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n    retries: {attempts: 0}\n";
    assert_eq!(problems(&format!("{VS}{spec}")), Vec::<String>::new());
}

/// Every field the mesh accepts but does not honour is reported where the
/// user looks, as a warning; the object is still served.
#[test]
fn accepted_but_ignored_fields_are_warned_about() {
    let cases = [
        (
            "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: e, namespace: ns}\nspec:\n  filters:\n  - {filterName: envoy.lua, filterType: HTTP, listenerMatch: {listenerType: SIDECAR_INBOUND}, filterConfig: {inlineCode: x}}\n".to_string(),
            "spec",
        ),
        (
            "apiVersion: config.istio.io/v1alpha2\nkind: handler\nmetadata: {name: opa, namespace: istio-system}\nspec: {compiledAdapter: opa}\n".to_string(),
            "spec.compiledAdapter",
        ),
        (
            "apiVersion: config.istio.io/v1alpha2\nkind: QuotaSpec\nmetadata: {name: q, namespace: istio-system}\nspec: {rules: [{quotas: [{quota: requestcount, charge: 1}]}]}\n".to_string(),
            "spec",
        ),
    ];
    for (yaml, field) in cases {
        assert_eq!(problems(&yaml), Vec::<String>::new(), "served: {yaml}");
        let warned = warnings(&yaml);
        assert!(
            warned
                .iter()
                .any(|w| w.starts_with(&format!("warning: {field}: "))),
            "{field} in {warned:#?}"
        );
    }
}

/// Sidecars route TLS by SNI: a mesh VirtualService's TLS routes are
/// served without a warning.
#[test]
fn tls_routes_for_sidecars_are_not_warned_about() {
    let yaml = format!(
        "{VS}  hosts: [db.example.com]\n  tls:\n  - match: [{{port: 443, sniHosts: [db.example.com]}}]\n    route: [{{destination: {{host: db.example.com}}}}]\n"
    );
    assert_eq!(problems(&yaml), Vec::<String>::new(), "{yaml}");
    assert_eq!(warnings(&yaml), Vec::<String>::new(), "{yaml}");
}

/// What the proxy now honours is served without a warning: the outlier
/// sweep interval, hash cookies, the ring's minimum size.
#[test]
fn honoured_traffic_policy_fields_are_not_warned_about() {
    for policy in [
        "outlierDetection: {consecutiveErrors: 5, interval: 10s}",
        "loadBalancer: {consistentHash: {httpCookie: {name: u, ttl: 10s}}}",
        "loadBalancer: {consistentHash: {httpHeaderName: x-user, minimumRingSize: 1024}}",
    ] {
        let yaml = format!("{DR}  host: r\n  trafficPolicy:\n    {policy}\n");
        assert_eq!(problems(&yaml), Vec::<String>::new(), "{yaml}");
        assert_eq!(warnings(&yaml), Vec::<String>::new(), "{yaml}");
    }
}

#[test]
fn end_user_jwts_are_served_and_peer_jwts_refused_until_enforced() {
    let policy = "apiVersion: authentication.istio.io/v1alpha1\nkind: Policy\nmetadata: {name: jwt, namespace: ns}\nspec:\n  origins: [{jwt: {issuer: https://issuer.example, jwksUri: https://issuer.example/jwks}}]\n  principalBinding: USE_ORIGIN\n";
    assert_eq!(problems(policy), Vec::<String>::new());
    assert_eq!(warnings(policy), Vec::<String>::new());
    let peer = "apiVersion: authentication.istio.io/v1alpha1\nkind: Policy\nmetadata: {name: jwt, namespace: ns}\nspec:\n  peers: [{jwt: {issuer: https://issuer.example}}]\n";
    let found = problems(peer);
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("spec.peers[0].jwt: ") && p.contains("not enforced")),
        "{found:#?}"
    );
}

#[test]
fn a_binding_property_rbac_cannot_check_is_refused() {
    let binding = "apiVersion: rbac.istio.io/v1alpha1\nkind: ServiceRoleBinding\nmetadata: {name: b, namespace: ns}\nspec:\n  roleRef: {kind: ServiceRole, name: reader}\n  subjects:\n  - properties: {\"request.auth.claims[group]\": reviewers, source.ip: 10.0.0.0/8}\n  - properties: {\"destination.labels[app]\": web}\n";
    let found = problems(binding);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with("spec.subjects[1].properties")
            && found[0].contains("destination.labels[app]"),
        "{found:#?}"
    );
}
