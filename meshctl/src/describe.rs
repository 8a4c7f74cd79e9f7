//! `meshctl describe service|pod NAME`: which VirtualServices,
//! DestinationRule, authentication policy and RBAC roles apply to a
//! service (or to each service of a pod), and why, from Pilot's
//! `/debug/describe`: Pilot answers by the rules it generates with.

use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Debug, Subcommand)]
pub enum Describe {
    /// A service: its host, or a prefix of it (`reviews.bookinfo`).
    Service(Target),
    /// A pod with a proxy connected to Pilot: `NAME[.NAMESPACE]`.
    Pod(Target),
}

#[derive(Debug, Args)]
pub struct Target {
    pub name: String,
    #[command(flatten)]
    pub pilot: crate::admin::PilotArgs,
    /// `json` for Pilot's answer as it is.
    #[arg(long, short = 'o', value_parser = ["json", "short"], default_value = "short")]
    pub output: String,
}

pub async fn run(command: Describe) -> anyhow::Result<()> {
    let (key, target) = match &command {
        Describe::Service(t) => ("service", t),
        Describe::Pod(t) => ("pod", t),
    };
    let pilot = target.pilot.admin().await?;
    let mut url = reqwest::Url::parse(&format!("http://{pilot}/debug/describe"))?;
    url.query_pairs_mut().append_pair(key, &target.name);
    let text = crate::admin::page(url.as_str()).await?;
    if target.output == "json" {
        println!("{text}");
        return Ok(());
    }
    let answer: Value = serde_json::from_str(&text)?;
    print!("{}", render(&answer));
    Ok(())
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// The answer as text, pod first when there is one.
fn render(answer: &Value) -> String {
    let mut out = String::new();
    if let Some(pod) = answer["pod"].as_str() {
        out.push_str(&format!("Pod: {pod}\n"));
        out.push_str(&format!("   Node: {}\n", s(&answer["node"])));
        out.push_str(&format!(
            "   Service account: {}\n",
            s(&answer["service_account"])
        ));
        let labels: Vec<String> = answer["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", s(v)))
            .collect();
        out.push_str(&format!("   Labels: {}\n", labels.join(",")));
        match answer["sidecar"].as_object() {
            Some(sc) => out.push_str(&format!(
                "   Sidecar: {}.{} scopes what it sees\n",
                s(&sc["name"]),
                s(&sc["namespace"])
            )),
            None => out.push_str("   Sidecar: none (it sees every service exported to it)\n"),
        }
        for (type_url, t) in answer["sync"]["types"].as_object().into_iter().flatten() {
            let short = type_url.rsplit('.').next().unwrap_or(type_url);
            let state = crate::proxy_status::state(Some(t));
            out.push_str(&format!("   {short}: {state}\n"));
        }
        if list(&answer["services"]).is_empty() {
            out.push_str("   No service selects this pod.\n");
        }
    }
    for service in list(&answer["services"]) {
        out.push_str("--------------------\n");
        out.push_str(&format!("Service: {}\n", s(&service["host"])));
        for port in list(&service["ports"]) {
            out.push_str(&format!(
                "   Port: {} {}/{}",
                s(&port["name"]),
                port["port"],
                s(&port["protocol"])
            ));
            if let Some(ports) = service["pod_ports"].as_array() {
                let i = list(&service["ports"])
                    .iter()
                    .position(|p| p == port)
                    .unwrap_or(0);
                if let Some(target) = ports.get(i) {
                    out.push_str(&format!(" (pod port {target})"));
                }
            }
            out.push('\n');
            out.push_str(&format!(
                "   mTLS: server {} ({}, policy {}), clients send {} (DestinationRule {}): {}\n",
                s(&port["server_protocol"]),
                s(&port["server_mode"]),
                s(&port["authentication_policy_name"]),
                s(&port["client_protocol"]),
                s(&port["destination_rule_name"]),
                s(&port["TLS_conflict_status"]),
            ));
        }
        match service["destination_rule"].as_object() {
            Some(dr) => {
                out.push_str(&format!(
                    "DestinationRule: {}.{}: {}\n",
                    s(&dr["name"]),
                    s(&dr["namespace"]),
                    s(&dr["why"])
                ));
                if let Some(mode) = dr["tls_mode"].as_str() {
                    out.push_str(&format!("   Traffic policy TLS mode: {mode}\n"));
                }
                let subsets: Vec<String> = list(&dr["subsets"])
                    .iter()
                    .map(|sub| match sub["pod_matches"].as_bool() {
                        Some(true) => format!("{} (this pod)", s(&sub["name"])),
                        _ => s(&sub["name"]).to_string(),
                    })
                    .collect();
                if !subsets.is_empty() {
                    out.push_str(&format!("   Subsets: {}\n", subsets.join(", ")));
                }
            }
            None => out.push_str("DestinationRule: none\n"),
        }
        let virtual_services = list(&service["virtual_services"]);
        if virtual_services.is_empty() {
            out.push_str("VirtualService: none (default routing)\n");
        }
        for vs in virtual_services {
            let gateways: Vec<&str> = list(&vs["gateways"]).iter().map(s).collect();
            out.push_str(&format!(
                "VirtualService: {}.{} (gateways {}): {}\n",
                s(&vs["name"]),
                s(&vs["namespace"]),
                gateways.join(", "),
                s(&vs["why"])
            ));
        }
        let rbac = &service["rbac"];
        if rbac["enabled"].as_bool() == Some(true) {
            out.push_str(&format!("RBAC: enabled: {}\n", s(&rbac["why"])));
            let roles = list(&rbac["roles"]);
            if roles.is_empty() {
                out.push_str("   No ServiceRole names it: every request is denied\n");
            }
            for role in roles {
                let bindings: Vec<&str> = list(&role["bindings"]).iter().map(s).collect();
                out.push_str(&format!(
                    "   ServiceRole {} ({}), bound by {}\n",
                    s(&role["name"]),
                    s(&role["why"]),
                    if bindings.is_empty() {
                        "no binding".to_string()
                    } else {
                        bindings.join(", ")
                    }
                ));
            }
        } else {
            out.push_str(&format!("RBAC: off: {}\n", s(&rbac["why"])));
        }
    }
    out
}
