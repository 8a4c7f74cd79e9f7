//! The sample application under `meshctl up`: Bookinfo's config
//! (`examples/bookinfo`, and the standard telemetry of `examples/mixer`),
//! and for each workload a `sample-app` process and a proxy in local mode:
//! mesh traffic in on the workload's own port, an HTTP proxy out that the
//! app uses as `HTTP_PROXY`, its certificate from Citadel, its checks and
//! reports to the Mixers. In front, the ingress gateway (the proxy as a
//! `router`) serves Istio's `bookinfo-gateway`: HTTP, and HTTPS with a
//! certificate made at start. With OS-chosen ports, the config's ports
//! move with them.

use std::{collections::BTreeMap, path::Path};

use component::{cli::Cli, flags};

use super::{ControlPlane, Plan, Ports};

/// The config files, as `examples/` has them.
const FILES: &[(&str, &str)] = &[
    (
        "services.yaml",
        include_str!("../../../examples/bookinfo/services.yaml"),
    ),
    (
        "destination-rules.yaml",
        include_str!("../../../examples/bookinfo/destination-rules.yaml"),
    ),
    (
        "virtual-services.yaml",
        include_str!("../../../examples/bookinfo/virtual-services.yaml"),
    ),
    (
        "sidecars.yaml",
        include_str!("../../../examples/bookinfo/sidecars.yaml"),
    ),
    (
        "security.yaml",
        include_str!("../../../examples/bookinfo/security.yaml"),
    ),
    (
        "policy.yaml",
        include_str!("../../../examples/bookinfo/policy.yaml"),
    ),
    (
        "gateway.yaml",
        include_str!("../../../examples/bookinfo/gateway.yaml"),
    ),
    (
        "attributes.yaml",
        include_str!("../../../examples/mixer/attributes.yaml"),
    ),
    (
        "telemetry.yaml",
        include_str!("../../../examples/mixer/telemetry.yaml"),
    ),
];

/// One workload, with the ports `examples/bookinfo` gives it.
#[derive(Debug)]
struct Workload {
    app: &'static str,
    version: &'static str,
    /// Where its sidecar takes mesh traffic.
    inbound: u16,
    /// Where the app itself listens.
    port: u16,
    /// The sidecar's HTTP proxy for the app's calls.
    egress: u16,
}

const WORKLOADS: &[Workload] = &[
    workload("productpage", "v1", 9081, 19081, 15101),
    workload("details", "v1", 9082, 19082, 15102),
    workload("reviews", "v1", 9083, 19083, 15103),
    workload("reviews", "v2", 9084, 19084, 15104),
    workload("reviews", "v3", 9085, 19085, 15105),
    workload("ratings", "v1", 9086, 19086, 15106),
];

const fn workload(
    app: &'static str,
    version: &'static str,
    inbound: u16,
    port: u16,
    egress: u16,
) -> Workload {
    Workload {
        app,
        version,
        inbound,
        port,
        egress,
    }
}

/// The ingress gateway, as `meshctl up` names it.
const GATEWAY: &str = "istio-ingressgateway";
/// The ingress gateway's ports in `examples/bookinfo/gateway.yaml`.
const GATEWAY_HTTP: u16 = 8080;
const GATEWAY_HTTPS: u16 = 8443;
/// The gateway's HTTPS credential, as the Gateway names it.
const GATEWAY_CREDENTIAL: &str = "bookinfo-credential";
/// Where the gateway's credentials go, in the state directory.
const CREDENTIALS: &str = "credentials";

/// The certificate the gateway serves HTTPS with, for clients to trust.
pub fn gateway_certificate(state_dir: &Path) -> std::path::PathBuf {
    state_dir
        .join(CREDENTIALS)
        .join(GATEWAY_CREDENTIAL)
        .join("tls.crt")
}

/// Istio's ingress gateway: its namespace and service account.
const GATEWAY_NAMESPACE: &str = "istio-system";
const GATEWAY_ACCOUNT: &str = "istio-ingressgateway-service-account";

/// Istio's Bookinfo service accounts, and the token each presents to Citadel.
fn account(app: &str) -> String {
    format!("bookinfo-{app}")
}

/// The workloads to run, and the ports chosen for this run by the port
/// the example files use.
pub struct Sample {
    workloads: Vec<&'static Workload>,
    ports: BTreeMap<u16, u16>,
}

impl Workload {
    /// `app-version`, as `meshctl up` lists it.
    fn name(&self) -> String {
        format!("{}-{}", self.app, self.version)
    }
}

/// The workloads named in `names` (`reviews-v2`), or all when it is empty.
fn chosen(names: &[String]) -> anyhow::Result<Vec<&'static Workload>> {
    if names.is_empty() {
        return Ok(WORKLOADS.iter().collect());
    }
    names
        .iter()
        .map(|name| {
            WORKLOADS.iter().find(|w| w.name() == *name).ok_or_else(|| {
                let known: Vec<String> = WORKLOADS.iter().map(Workload::name).collect();
                anyhow::anyhow!(
                    "--workloads: no workload {name:?} in Bookinfo (it has {})",
                    known.join(", ")
                )
            })
        })
        .collect()
}

impl Sample {
    pub fn new(ports: &Ports, workloads: &[String]) -> anyhow::Result<Self> {
        let workloads = chosen(workloads)?;
        let mut chosen = BTreeMap::new();
        let gateway = [GATEWAY_HTTP, GATEWAY_HTTPS];
        for port in WORKLOADS
            .iter()
            .flat_map(|w| [w.inbound, w.port, w.egress])
            .chain(gateway)
        {
            chosen.insert(port, ports.pick(port)?.port());
        }
        Ok(Self {
            workloads,
            ports: chosen,
        })
    }

    fn port(&self, example: u16) -> u16 {
        self.ports[&example]
    }

    /// Each chosen workload's app and proxy, and the gateway (which takes
    /// other clusters' calls when `cross_cluster`); writes the Citadel
    /// bootstrap tokens to `tokens` (and each account's own token beside
    /// it).
    pub fn plans(
        &self,
        cp: &ControlPlane,
        tokens: &Path,
        ports: &Ports,
        cross_cluster: bool,
    ) -> anyhow::Result<Vec<Plan>> {
        let dir = tokens.with_extension("d");
        std::fs::create_dir_all(&dir)?;
        let mut lines = String::new();
        let mut plans = Vec::new();
        for w in &self.workloads {
            let account = account(w.app);
            let token = format!("{account}-token");
            let token_file = dir.join(format!("{account}.token"));
            if !lines.contains(&format!("bookinfo/{account} ")) {
                lines.push_str(&format!("bookinfo/{account} {token}\n"));
                std::fs::write(&token_file, &token)?;
            }
            let name = w.name();
            let app = super::loopback(self.port(w.port));
            let inbound = super::loopback(self.port(w.inbound));
            let egress = super::loopback(self.port(w.egress));
            let app_args = flags!(sample_app::Args {
                role: w.app,
                version: w.version,
                listen: app,
            });
            plans.push(Plan {
                name: name.clone(),
                binary: "sample-app",
                args: app_args.build()?,
                env: vec![("HTTP_PROXY", format!("http://{egress}"))],
                ready: format!("http://{app}/health"),
                ports: vec![("app", app.to_string())],
            });
            let (admin, stats, health) = (ports.any()?, ports.any()?, ports.any()?);
            let mut proxy_args = flags!(Cli<proxy::ProxyArgs> {
                args.pilot: cp.xds,
                args.node.pod: format!("{name}-0"),
                args.node.namespace: "bookinfo",
                args.node.service_account: &account,
                args.node.labels: format!("app={},version={}", w.app, w.version),
                args.agent.citadel: cp.ca,
                args.agent.citadel_root: cp.ca_root.display(),
                args.agent.citadel_token_file: token_file.display(),
                args.agent.citadel_hostname: "localhost",
                args.agent.cert_ttl: humantime::format_duration(cp.cert_ttl),
                args.mixer.mixer_policy: cp.policy,
                args.mixer.mixer_telemetry: cp.telemetry,
                args.stats_addr: stats,
                args.health_addr: health,
                args.concurrency: 1,
                // A policy Mixer restarting (or the monolith) costs no
                // request: its checks wait for it, up to some 7 s.
                args.mixer.mixer_check_retries: 10,
            })
            .admin_addr(admin);
            // The quota of examples/bookinfo/policy.yaml is asked for by
            // the service it limits.
            if w.app == "ratings" {
                proxy_args = proxy_args.extend(flags!(Cli<proxy::ProxyArgs> {
                    args.mixer.mixer_quota: "requestcountquota",
                }));
            }
            plans.push(Plan {
                name: format!("{name}-proxy"),
                binary: "proxy",
                args: proxy_args.build()?,
                env: Vec::new(),
                ready: launch::ready_url(admin),
                ports: vec![
                    ("admin", admin.to_string()),
                    ("inbound", inbound.to_string()),
                    ("http-proxy", egress.to_string()),
                ],
            });
        }
        lines.push_str(&format!(
            "{GATEWAY_NAMESPACE}/{GATEWAY_ACCOUNT} {GATEWAY_ACCOUNT}-token\n"
        ));
        let gateway_token = dir.join(format!("{GATEWAY_ACCOUNT}.token"));
        std::fs::write(&gateway_token, format!("{GATEWAY_ACCOUNT}-token"))?;
        std::fs::write(tokens, lines)?;
        let credentials = tokens.with_file_name(CREDENTIALS);
        let mut gateway = self.gateway(cp, &gateway_token, &credentials, ports)?;
        if cross_cluster {
            let port = super::cluster::CROSS_CLUSTER_PORT;
            gateway
                .ports
                .push(("cross-cluster", format!("0.0.0.0:{port}")));
        }
        plans.push(gateway);
        Ok(plans)
    }

    /// The ingress gateway, and the certificate it serves HTTPS with, made
    /// now for `localhost` and `127.0.0.1` into `credentials`.
    fn gateway(
        &self,
        cp: &ControlPlane,
        token_file: &Path,
        credentials: &Path,
        ports: &Ports,
    ) -> anyhow::Result<Plan> {
        let credential = credentials.join(GATEWAY_CREDENTIAL);
        std::fs::create_dir_all(&credential)?;
        let key = rcgen::KeyPair::generate()?;
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let cert = rcgen::CertificateParams::new(names)?.self_signed(&key)?;
        std::fs::write(credential.join("tls.crt"), cert.pem())?;
        std::fs::write(credential.join("tls.key"), key.serialize_pem())?;
        let (admin, stats, health) = (ports.any()?, ports.any()?, ports.any()?);
        let args = flags!(Cli<proxy::ProxyArgs> {
            args.pilot: cp.xds,
            args.node.node_type: "router",
            args.node.pod: "istio-ingressgateway-0",
            args.node.namespace: GATEWAY_NAMESPACE,
            args.node.service_account: GATEWAY_ACCOUNT,
            args.node.labels: "istio=ingressgateway",
            args.agent.citadel: cp.ca,
            args.agent.citadel_root: cp.ca_root.display(),
            args.agent.citadel_token_file: token_file.display(),
            args.agent.citadel_hostname: "localhost",
            args.agent.cert_ttl: humantime::format_duration(cp.cert_ttl),
            args.secrets.credentials_dir: credentials.display(),
            args.stats_addr: stats,
            args.health_addr: health,
            args.concurrency: 1,
        })
        .admin_addr(admin);
        let (http, https) = (
            super::loopback(self.port(GATEWAY_HTTP)),
            super::loopback(self.port(GATEWAY_HTTPS)),
        );
        Ok(Plan {
            name: GATEWAY.into(),
            binary: "proxy",
            args: args.build()?,
            env: Vec::new(),
            ready: launch::ready_url(admin),
            ports: vec![
                ("admin", admin.to_string()),
                ("http", http.to_string()),
                ("https", https.to_string()),
            ],
        })
    }
}

/// The config files to serve: the examples, with this run's ports.
pub fn config(sample: Option<&Sample>) -> Vec<(String, String)> {
    FILES
        .iter()
        .map(|(name, text)| {
            let text = match sample {
                Some(s) => s.ports.iter().fold(text.to_string(), |t, (from, to)| {
                    replace_number(&t, *from, *to)
                }),
                None => text.to_string(),
            };
            (name.to_string(), text)
        })
        .collect()
}

/// `text` with every whole occurrence of the number `from` made `to`.
fn replace_number(text: &str, from: u16, to: u16) -> String {
    let (from, to) = (from.to_string(), to.to_string());
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&from) {
        let before = rest[..at].chars().last().or_else(|| out.chars().last());
        let after = rest[at + from.len()..].chars().next();
        out.push_str(&rest[..at]);
        let whole = !before.is_some_and(|c| c.is_ascii_digit())
            && !after.is_some_and(|c| c.is_ascii_digit());
        out.push_str(if whole { &to } else { &from });
        rest = &rest[at + from.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_numbers_move() {
        let text = "ports: {http: 9081}\n  number: 9080\n  defaultEndpoint: 127.0.0.1:19081\n";
        let moved = replace_number(&replace_number(text, 9081, 40001), 19081, 40002);
        assert_eq!(
            moved,
            "ports: {http: 40001}\n  number: 9080\n  defaultEndpoint: 127.0.0.1:40002\n"
        );
    }

    #[test]
    fn workloads_are_chosen_by_name_and_an_unknown_one_is_named() {
        let names = |w: Vec<&Workload>| w.iter().map(|w| w.name()).collect::<Vec<_>>();
        assert_eq!(chosen(&[]).unwrap().len(), WORKLOADS.len());
        let some = chosen(&["ratings-v1".into(), "reviews-v2".into()]).unwrap();
        assert_eq!(names(some), ["ratings-v1", "reviews-v2"]);
        let error = chosen(&["ratings-v2".into()]).unwrap_err().to_string();
        assert!(
            error.contains("\"ratings-v2\"") && error.contains("reviews-v3, ratings-v1"),
            "{error}"
        );
    }

    #[test]
    fn every_workload_port_is_in_the_examples() {
        let text: String = FILES.iter().map(|(_, t)| *t).collect();
        let known: Vec<u16> = WORKLOADS
            .iter()
            .flat_map(|w| [w.inbound, w.port, w.egress])
            .chain([GATEWAY_HTTP, GATEWAY_HTTPS])
            .collect();
        for port in known {
            assert!(
                text.contains(&port.to_string()),
                "{port} unused by the examples"
            );
        }
    }
}
