//! `meshctl authn tls-check [SERVICE]`: for every port of every service
//! (or the named one), the mTLS its server side accepts, what its clients
//! send, and whether the two conflict, from Pilot's
//! `/debug/authenticationz`, in `istioctl authn tls-check`'s columns.

use clap::{Args, Subcommand};
use serde_json::Value;

use crate::table;

#[derive(Debug, Subcommand)]
pub enum Authn {
    /// Server and client mTLS of each service port, and conflicts.
    TlsCheck(TlsCheckArgs),
}

#[derive(Debug, Args)]
pub struct TlsCheckArgs {
    /// The service: its host, or a prefix of it (`reviews`,
    /// `reviews.bookinfo`); every service when absent.
    pub service: Option<String>,
    /// The clients' namespace, which decides the DestinationRule they
    /// see; each service's own when absent.
    #[arg(long)]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub pilot: crate::admin::PilotArgs,
    /// `json` for Pilot's answer as it is.
    #[arg(long, short = 'o', value_parser = ["json", "short"], default_value = "short")]
    pub output: String,
}

pub async fn run(command: Authn) -> anyhow::Result<()> {
    let Authn::TlsCheck(args) = command;
    let pilot = args.pilot.admin().await?;
    let mut url = reqwest::Url::parse(&format!("http://{pilot}/debug/authenticationz"))?;
    for (key, value) in [("service", &args.service), ("namespace", &args.namespace)] {
        if let Some(value) = value {
            url.query_pairs_mut().append_pair(key, value);
        }
    }
    let text = crate::admin::page(url.as_str()).await?;
    if args.output == "json" {
        println!("{text}");
        return Ok(());
    }
    let mut checks: Vec<Value> = serde_json::from_str(&text)?;
    if let Some(service) = &args.service {
        anyhow::ensure!(
            !checks.is_empty(),
            "Pilot knows no service named {service:?}"
        );
    }
    checks.sort_by(|a, b| {
        (a["host"].as_str(), a["port"].as_u64()).cmp(&(b["host"].as_str(), b["port"].as_u64()))
    });
    print!("{}", render(&checks));
    Ok(())
}

/// The table of Pilot's checks.
fn render(checks: &[Value]) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|c| {
            vec![
                format!("{}:{}", s(&c["host"]), c["port"]),
                s(&c["TLS_conflict_status"]),
                s(&c["server_protocol"]),
                s(&c["client_protocol"]),
                s(&c["authentication_policy_name"]),
                s(&c["destination_rule_name"]),
            ]
        })
        .collect();
    table::render(
        &[
            "HOST:PORT",
            "STATUS",
            "SERVER",
            "CLIENT",
            "AUTHN POLICY",
            "DESTINATION RULE",
        ],
        &rows,
    )
}
