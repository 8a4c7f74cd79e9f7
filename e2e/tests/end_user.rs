//! End-user authentication, end to end: tokens made and signed by OpenSSL
//! (RS256), not by the proxy's own library; an authentication `Policy`
//! with a JWT origin, served by the real `galley`; the real `pilot` fetches the
//! issuer's keys from its `jwksUri` over HTTPS (a server with its own CA,
//! trusted through `SSL_CERT_FILE`) and sends them inline; the workload's
//! sidecar lets through a valid token and answers 401, with the reason,
//! an expired one, one from another issuer, and none at all, except on
//! the path the policy's trigger rule excludes; RBAC then reads the
//! token's claims.

use std::{path::PathBuf, process::Command, time::Duration};

use base64::Engine;
use serde_json::json;
use testkit::*;

const ISSUER: &str = "https://id.example.com";

/// An RS256 key made and used by OpenSSL, so that the tokens the sidecar
/// checks come from another implementation than its own.
struct OpensslKey {
    pem: PathBuf,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn openssl(args: &[&str], input: Option<&[u8]>) -> Vec<u8> {
    use std::io::Write;
    ensure_package(&["/usr/bin/openssl"], "openssl");
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.unwrap_or_default()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl {args:?}");
    out.stdout
}

impl OpensslKey {
    fn new(dir: &std::path::Path) -> Self {
        let pem = dir.join("issuer-key.pem");
        openssl(&["genrsa", "-out", pem.to_str().unwrap(), "2048"], None);
        Self { pem }
    }

    /// The public half, as a JWKS.
    fn jwks(&self) -> String {
        let out = openssl(
            &[
                "rsa",
                "-in",
                self.pem.to_str().unwrap(),
                "-noout",
                "-modulus",
            ],
            None,
        );
        let hex = String::from_utf8(out).unwrap();
        let hex = hex.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        json!({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig",
            "n": b64(&n), "e": "AQAB"}]})
        .to_string()
    }

    fn token(&self, issuer: &str, expires_in: i64, group: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": "k1"});
        let claims = json!({"iss": issuer, "sub": "jason", "aud": "bookinfo", "group": group,
            "exp": now + expires_in});
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = openssl(
            &["dgst", "-sha256", "-sign", self.pem.to_str().unwrap()],
            Some(signed.as_bytes()),
        );
        format!("{signed}.{}", b64(&signature))
    }
}

#[tokio::test]
async fn a_jwt_origin_lets_valid_tokens_through_and_refuses_the_rest_with_401() {
    let dir = tempfile::tempdir().unwrap();
    let signing = OpensslKey::new(dir.path());
    let (keys, keys_ca) = tls_server(&["localhost"], signing.jwks());
    let ca_file = dir.path().join("keys-ca.pem");
    std::fs::write(&ca_file, keys_ca).unwrap();
    let (app, inbound) = (http_app("app").await, free_addr());
    let config = format!(
        "
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {service_port}, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {inbound_port}}}, labels: {{app: web}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: Sidecar
metadata: {{name: web, namespace: shop}}
spec:
  workloadSelector: {{labels: {{app: web}}}}
  ingress:
  - port: {{number: {inbound_port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:{app_port}
  egress:
  - hosts: [./*]
---
apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {{name: web, namespace: shop}}
spec:
  targets: [{{name: web}}]
  origins:
  - jwt:
      issuer: {ISSUER}
      audiences: [bookinfo]
      jwksUri: https://localhost:{keys_port}/jwks
      trigger_rules: [{{excluded_paths: [{{exact: /health}}]}}]
---
apiVersion: rbac.istio.io/v1alpha1
kind: RbacConfig
metadata: {{name: default}}
spec:
  mode: ON_WITH_INCLUSION
  inclusion: {{services: [web.shop.svc.cluster.local]}}
---
apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRole
metadata: {{name: reader, namespace: shop}}
spec:
  rules: [{{services: [web.shop.svc.cluster.local], methods: [GET]}}]
---
apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRoleBinding
metadata: {{name: reviewers, namespace: shop}}
spec:
  roleRef: {{kind: ServiceRole, name: reader}}
  subjects: [{{properties: {{\"request.auth.claims[group]\": reviewers}}}}]
---
apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRole
metadata: {{name: health, namespace: shop}}
spec:
  rules: [{{services: [web.shop.svc.cluster.local], paths: [/health]}}]
---
apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRoleBinding
metadata: {{name: anyone-health, namespace: shop}}
spec:
  roleRef: {{kind: ServiceRole, name: health}}
  subjects: [{{user: \"*\"}}]
",
        inbound_port = inbound.port(),
        app_port = app.port(),
        // The sidecar binds its outbound listener on the service port:
        // one free on this machine.
        service_port = free_addr().port(),
        keys_port = keys.port(),
    );
    let config_dir = config_dir(&[("end-user.yaml", &config)]);
    let ca = ca_file.display().to_string();
    let (_galley, _pilot, xds) =
        galley_and_pilot(config_dir.path(), &[("SSL_CERT_FILE", ca.as_str())]).await;
    let (_sidecar, _) = local_proxy(xds, &["--pod", "web-1", "--labels", "app=web"]).await;

    install_crypto();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let send = |path: &str, token: Option<String>| {
        let mut request = client.get(format!("http://{inbound}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap().trim().to_string())
        }
    };
    // Until Pilot has fetched the keys, no token verifies.
    let valid = signing.token(ISSUER, 600, "reviewers");
    let mut served = (0, String::new());
    for _ in 0..100 {
        served = send("/reviews", Some(valid.clone())).await;
        if served.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served, (200, "app".to_string()));

    let refused = [
        (
            Some(signing.token(ISSUER, -3600, "reviewers")),
            "Jwt is expired",
        ),
        (
            Some(signing.token("https://evil.example", 600, "reviewers")),
            "Jwt issuer is not configured",
        ),
        (None, "Jwt is missing"),
    ];
    for (token, reason) in refused {
        assert_eq!(send("/reviews", token).await, (401, reason.to_string()));
    }
    // The claims reach RBAC: a valid token of another group is not a
    // reviewer.
    let reader = signing.token(ISSUER, 600, "readers");
    let refused = send("/reviews", Some(reader)).await;
    assert_eq!(refused, (403, "RBAC: access denied".to_string()));
    // The trigger rule leaves /health open.
    assert_eq!(send("/health", None).await, (200, "app".to_string()));
}
