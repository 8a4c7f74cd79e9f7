//! `meshctl version`: this client's version and, with `--remote`, each
//! running component's, asked on its admin port (`/version`), as
//! `istioctl version --remote` lists the control plane's: a mesh upgraded
//! one component at a time runs several versions at once.

use std::net::SocketAddr;

use clap::Args;
use serde_json::{Value, json};

use crate::up::control::Row;

#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Also ask every component of the running mesh.
    #[arg(long)]
    pub remote: bool,
    /// The mesh's control address; the latest `meshctl up`'s when absent.
    #[arg(long, requires = "remote")]
    pub control: Option<SocketAddr>,
    /// `json` for the figures as JSON.
    #[arg(long, short = 'o', value_parser = ["json"])]
    pub output: Option<String>,
}

/// What one component's admin port says of itself, or why it said nothing.
async fn ask(client: &reqwest::Client, row: &Row) -> Option<Value> {
    let (_, admin) = row.ports.iter().find(|(what, _)| what == "admin")?;
    let answer = async {
        let text = client
            .get(format!("http://{admin}/version"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        anyhow::Ok(serde_json::from_str::<Value>(&text)?)
    }
    .await;
    Some(match answer {
        Ok(v) => json!({"name": row.name, "version": v["version"], "binary": v["binary"]}),
        Err(e) => json!({"name": row.name, "error": format!("{e:#}")}),
    })
}

pub async fn run(args: VersionArgs) -> anyhow::Result<()> {
    let client_version = env!("CARGO_PKG_VERSION");
    let mut remote = Vec::new();
    if args.remote {
        let control = crate::up::control::address(args.control)?;
        let http = reqwest::Client::builder().no_proxy().build()?;
        for row in &crate::up::control::rows(&http, control).await? {
            remote.extend(ask(&http, row).await);
        }
    }
    if args.output.is_some() {
        let figures = json!({"client": client_version, "mesh": remote});
        println!("{}", serde_json::to_string_pretty(&figures)?);
        return Ok(());
    }
    if !args.remote {
        println!("meshctl {client_version}");
        return Ok(());
    }
    println!("client version: {client_version}");
    for c in &remote {
        match (c["version"].as_str(), c["error"].as_str()) {
            (Some(v), _) => println!("{} version: {v}", c["name"].as_str().unwrap_or_default()),
            (None, e) => println!(
                "{} version: unknown ({})",
                c["name"].as_str().unwrap_or_default(),
                e.unwrap_or("no answer")
            ),
        }
    }
    Ok(())
}
