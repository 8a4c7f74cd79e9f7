//! `meshctl proxy-config`: what one proxy holds, read from its admin port
//! (`/config_dump`, `/clusters`), as `istioctl proxy-config` prints it:
//! the same columns, order and filters, or the proxy's own JSON with
//! `-o json`. `secret` shows the workload certificate, its root and the
//! Gateways' credentials the proxy presents, which istioctl 1.1 did not
//! have; its columns are later istioctl's.

use std::net::SocketAddr;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::table;

#[derive(Debug, Subcommand)]
pub enum ProxyConfig {
    /// The proxy's clusters.
    #[command(alias = "cluster")]
    Clusters {
        #[command(flatten)]
        proxy: Proxy,
        /// Only clusters of this service (FQDN).
        #[arg(long)]
        fqdn: Option<String>,
        /// Only clusters of this port.
        #[arg(long)]
        port: Option<u16>,
        /// Only clusters of this subset.
        #[arg(long)]
        subset: Option<String>,
        /// Only `inbound` or `outbound` clusters.
        #[arg(long)]
        direction: Option<String>,
    },
    /// The proxy's listeners.
    #[command(alias = "listener")]
    Listeners {
        #[command(flatten)]
        proxy: Proxy,
        /// Only listeners on this address.
        #[arg(long)]
        address: Option<String>,
        /// Only listeners on this port.
        #[arg(long)]
        port: Option<u16>,
        /// Only `HTTP` or `TCP` listeners.
        #[arg(long = "type")]
        kind: Option<String>,
    },
    /// The route tables the proxy took over RDS.
    #[command(alias = "route")]
    Routes {
        #[command(flatten)]
        proxy: Proxy,
        /// Only the route table of this name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Every cluster's endpoints and their health.
    #[command(alias = "endpoint")]
    Endpoints {
        #[command(flatten)]
        proxy: Proxy,
        /// Only endpoints at this IP address.
        #[arg(long)]
        address: Option<String>,
        /// Only endpoints on this port.
        #[arg(long)]
        port: Option<u16>,
        /// Only endpoints of this cluster.
        #[arg(long)]
        cluster: Option<String>,
        /// Only endpoints of this status (`HEALTHY`, `UNHEALTHY`).
        #[arg(long)]
        status: Option<String>,
    },
    /// The workload certificate the proxy presents, and its root.
    #[command(alias = "secrets")]
    Secret {
        #[command(flatten)]
        proxy: Proxy,
    },
}

/// Which proxy, and how to print.
#[derive(Debug, Args)]
pub struct Proxy {
    /// The proxy: its name in `meshctl status` (`reviews-v1-proxy`, or
    /// `reviews-v1`), or its admin address.
    pub proxy: String,
    /// The mesh's control address; the latest `meshctl up`'s when absent.
    #[arg(long)]
    pub control: Option<SocketAddr>,
    /// `json` for the proxy's own JSON.
    #[arg(long, short = 'o', value_parser = ["json", "short"], default_value = "short")]
    pub output: String,
}

impl Proxy {
    async fn admin(&self) -> anyhow::Result<String> {
        match self.proxy.parse::<SocketAddr>() {
            Ok(addr) => Ok(addr.to_string()),
            Err(_) => crate::admin::admin_of(self.control, &self.proxy).await,
        }
    }

    async fn config_dump(&self) -> anyhow::Result<Value> {
        let url = format!("http://{}/config_dump", self.admin().await?);
        Ok(serde_json::from_str(&crate::admin::page(&url).await?)?)
    }

    fn json(&self) -> bool {
        self.output == "json"
    }
}

pub async fn run(command: ProxyConfig) -> anyhow::Result<()> {
    print!("{}", render(command).await?);
    Ok(())
}

async fn render(command: ProxyConfig) -> anyhow::Result<String> {
    Ok(match command {
        ProxyConfig::Clusters {
            proxy,
            fqdn,
            port,
            subset,
            direction,
        } => {
            let dump = proxy.config_dump().await?;
            let mut clusters: Vec<(ClusterName, &Value)> = array(&dump["clusters"])
                .iter()
                .map(|c| (ClusterName::parse(str(&c["name"])), c))
                .filter(|(n, _)| {
                    fqdn.as_ref().is_none_or(|f| &n.fqdn == f)
                        && port.is_none_or(|p| n.port == Some(p))
                        && subset.as_ref().is_none_or(|s| &n.subset == s)
                        && direction.as_ref().is_none_or(|d| &n.direction == d)
                })
                .collect();
            clusters.sort_by(|(a, _), (b, _)| a.order().cmp(&b.order()));
            if proxy.json() {
                return pretty(clusters.iter().map(|(_, c)| *c).collect());
            }
            let rows: Vec<Vec<String>> = clusters
                .iter()
                .map(|(n, c)| {
                    let dash = |s: &str| {
                        if s.is_empty() {
                            "-".into()
                        } else {
                            s.to_string()
                        }
                    };
                    vec![
                        n.fqdn.clone(),
                        n.port.map_or("-".into(), |p| p.to_string()),
                        dash(&n.subset),
                        dash(&n.direction),
                        discovery_type(&c["discovery"]).into(),
                    ]
                })
                .collect();
            table::render(
                &["SERVICE FQDN", "PORT", "SUBSET", "DIRECTION", "TYPE"],
                &rows,
            )
        }
        ProxyConfig::Listeners {
            proxy,
            address,
            port,
            kind,
        } => {
            let dump = proxy.config_dump().await?;
            let mut listeners: Vec<(String, u16, &str, &Value)> = array(&dump["listeners"])
                .iter()
                .filter_map(|l| {
                    let addr: SocketAddr = str(&l["address"]).parse().ok()?;
                    Some((addr.ip().to_string(), addr.port(), listener_type(l), l))
                })
                .filter(|(a, p, t, _)| {
                    address.as_ref().is_none_or(|x| x == a)
                        && port.is_none_or(|x| x == *p)
                        && kind.as_ref().is_none_or(|x| x.eq_ignore_ascii_case(t))
                })
                .collect();
            listeners.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
            if proxy.json() {
                return pretty(listeners.iter().map(|l| l.3).collect());
            }
            let rows: Vec<Vec<String>> = listeners
                .iter()
                .map(|(a, p, t, _)| vec![a.clone(), p.to_string(), t.to_string()])
                .collect();
            table::render(&["ADDRESS", "PORT", "TYPE"], &rows)
        }
        ProxyConfig::Routes { proxy, name } => {
            let dump = proxy.config_dump().await?;
            let routes: Vec<&Value> = array(&dump["routes"])
                .iter()
                .filter(|r| name.as_ref().is_none_or(|n| n == str(&r["name"])))
                .collect();
            if proxy.json() {
                return pretty(routes);
            }
            let rows: Vec<Vec<String>> = routes
                .iter()
                .map(|r| {
                    vec![
                        str(&r["name"]).to_string(),
                        array(&r["virtual_hosts"]).len().to_string(),
                    ]
                })
                .collect();
            format!(
                "NOTE: This output only contains routes loaded via RDS.\n{}",
                table::render(&["NAME", "VIRTUAL HOSTS"], &rows)
            )
        }
        ProxyConfig::Endpoints {
            proxy,
            address,
            port,
            cluster,
            status,
        } => {
            let url = format!("http://{}/clusters", proxy.admin().await?);
            let mut endpoints: Vec<Endpoint> = endpoints(&crate::admin::page(&url).await?)
                .into_iter()
                .filter(|e| {
                    address
                        .as_ref()
                        .is_none_or(|a| e.addr.ip().to_string() == *a)
                        && port.is_none_or(|p| e.addr.port() == p)
                        && cluster.as_ref().is_none_or(|c| &e.cluster == c)
                        && status
                            .as_ref()
                            .is_none_or(|s| s.eq_ignore_ascii_case(e.status))
                })
                .collect();
            endpoints.sort_by(|a, b| (&a.cluster, a.addr).cmp(&(&b.cluster, b.addr)));
            let rows: Vec<Vec<String>> = endpoints
                .iter()
                .map(|e| vec![e.addr.to_string(), e.status.into(), e.cluster.clone()])
                .collect();
            if proxy.json() {
                let all = rows
                    .iter()
                    .map(|r| json!({"endpoint": r[0], "status": r[1], "cluster": r[2]}))
                    .collect::<Vec<_>>();
                return Ok(format!("{}\n", serde_json::to_string_pretty(&all)?));
            }
            table::render(&["ENDPOINT", "STATUS", "CLUSTER"], &rows)
        }
        ProxyConfig::Secret { proxy } => {
            let dump = proxy.config_dump().await?;
            let certificate = &dump["certificate"];
            let gateway = array(&dump["gateway_credentials"]);
            if proxy.json() {
                let secrets = json!({"certificate": certificate, "gateway_credentials": gateway});
                return Ok(format!("{}\n", serde_json::to_string_pretty(&secrets)?));
            }
            anyhow::ensure!(
                !certificate.is_null() || !gateway.is_empty(),
                "{} holds no certificate (yet)",
                proxy.proxy
            );
            // A credential a Gateway names and the proxy cannot find is
            // MISSING: the listener has nothing to present.
            let row = |name: &str, kind: &str, c: &Value| {
                let status = if c.get("error").is_some() {
                    "MISSING"
                } else {
                    "ACTIVE"
                };
                vec![
                    name.to_string(),
                    kind.to_string(),
                    status.to_string(),
                    valid_now(c).to_string(),
                    str(&c["serial_number"]).to_string(),
                    str(&c["not_after"]).to_string(),
                    str(&c["not_before"]).to_string(),
                ]
            };
            let mut rows = Vec::new();
            if !certificate.is_null() {
                rows.push(row("default", "Cert Chain", certificate));
                rows.push(row("ROOTCA", "CA", &certificate["root"]));
            }
            rows.extend(
                gateway
                    .iter()
                    .map(|c| row(str(&c["name"]), "Cert Chain", c)),
            );
            table::render(
                &[
                    "RESOURCE NAME",
                    "TYPE",
                    "STATUS",
                    "VALID CERT",
                    "SERIAL NUMBER",
                    "NOT AFTER",
                    "NOT BEFORE",
                ],
                &rows,
            )
        }
    })
}

/// A cluster name in Istio's `direction|port|subset|fqdn` form; any
/// other name is its own FQDN.
#[derive(Debug, PartialEq)]
struct ClusterName {
    direction: String,
    port: Option<u16>,
    subset: String,
    fqdn: String,
}

impl ClusterName {
    fn parse(name: &str) -> Self {
        let parts: Vec<&str> = name.split('|').collect();
        match parts[..] {
            [direction, port, subset, fqdn] => ClusterName {
                direction: direction.into(),
                port: port.parse().ok(),
                subset: subset.into(),
                fqdn: fqdn.into(),
            },
            _ => ClusterName {
                direction: String::new(),
                port: None,
                subset: String::new(),
                fqdn: name.into(),
            },
        }
    }

    /// istioctl's order: service, then subset, port, direction.
    fn order(&self) -> (&str, &str, u16, &str) {
        (
            &self.fqdn,
            &self.subset,
            self.port.unwrap_or(0),
            &self.direction,
        )
    }
}

/// Envoy's name for how a cluster finds its endpoints.
fn discovery_type(discovery: &Value) -> &'static str {
    if discovery.get("eds").is_some() {
        "EDS"
    } else if discovery.get("fixed").is_some() {
        "STATIC"
    } else if discovery == "original_dst" {
        "ORIGINAL_DST"
    } else {
        // Envoy's BlackHoleCluster is a static cluster with no hosts.
        "STATIC"
    }
}

/// `HTTP` when the listener's first chain ends in HTTP routing, as
/// istioctl tells by the HTTP connection manager; else `TCP`.
fn listener_type(listener: &Value) -> &'static str {
    match array(&listener["chains"]).first() {
        Some(chain) if chain["app"].get("http").is_some() => "HTTP",
        _ => "TCP",
    }
}

/// One endpoint of one cluster, from `/clusters`.
#[derive(Debug, PartialEq)]
struct Endpoint {
    addr: SocketAddr,
    status: &'static str,
    cluster: String,
}

/// The endpoints in the proxy's `/clusters` text (Envoy's
/// `cluster::address::stat::value` lines).
fn endpoints(text: &str) -> Vec<Endpoint> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.rsplitn(4, "::");
            let (value, stat, addr, cluster) =
                (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
            (stat == "health_flags").then_some(())?;
            Some(Endpoint {
                addr: addr.parse().ok()?,
                status: if value == "healthy" {
                    "HEALTHY"
                } else {
                    "UNHEALTHY"
                },
                cluster: cluster.into(),
            })
        })
        .collect()
}

/// Whether now is within the certificate's validity.
fn valid_now(certificate: &Value) -> bool {
    let at = |field: &str| humantime::parse_rfc3339(str(&certificate[field])).ok();
    let now = std::time::SystemTime::now();
    matches!((at("not_before"), at("not_after")), (Some(b), Some(a)) if b <= now && now < a)
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn str(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn pretty(values: Vec<&Value>) -> anyhow::Result<String> {
    Ok(format!("{}\n", serde_json::to_string_pretty(&values)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_split_as_istio_names_them() {
        assert_eq!(
            ClusterName::parse("outbound|9080|v1|reviews.bookinfo.svc.cluster.local"),
            ClusterName {
                direction: "outbound".into(),
                port: Some(9080),
                subset: "v1".into(),
                fqdn: "reviews.bookinfo.svc.cluster.local".into(),
            }
        );
        let other = ClusterName::parse("BlackHoleCluster");
        assert_eq!(
            (other.fqdn.as_str(), other.port),
            ("BlackHoleCluster", None)
        );
    }

    #[test]
    fn endpoints_come_from_health_lines_only() {
        let text = "outbound|9080||a.b.svc.cluster.local::10.0.0.1:9080::health_flags::healthy\n\
                    outbound|9080||a.b.svc.cluster.local::10.0.0.1:9080::weight::1\n\
                    inbound|80|http|c::127.0.0.1:80::health_flags::/failed_outlier_check\n";
        assert_eq!(
            endpoints(text),
            vec![
                Endpoint {
                    addr: "10.0.0.1:9080".parse().unwrap(),
                    status: "HEALTHY",
                    cluster: "outbound|9080||a.b.svc.cluster.local".into(),
                },
                Endpoint {
                    addr: "127.0.0.1:80".parse().unwrap(),
                    status: "UNHEALTHY",
                    cluster: "inbound|80|http|c".into(),
                },
            ]
        );
    }
}
