//! What the debugging commands read: the admin ports of a running mesh's
//! components, found by name in `meshctl up`'s table or given.

use std::net::SocketAddr;

use clap::Args;

use crate::up::control::{self, Row};

/// Where Pilot's admin port is: given, or found in a running mesh.
#[derive(Debug, Args)]
pub struct PilotArgs {
    /// Pilot's admin address; the running mesh's Pilot when absent.
    #[arg(long)]
    pub pilot: Option<String>,
    /// The mesh's control address; the latest `meshctl up`'s when absent.
    #[arg(long, conflicts_with = "pilot")]
    pub control: Option<SocketAddr>,
}

impl PilotArgs {
    pub async fn admin(&self) -> anyhow::Result<String> {
        match &self.pilot {
            Some(pilot) => Ok(pilot.clone()),
            None => admin_of(self.control, "pilot").await,
        }
    }
}

/// The admin address of the running mesh's component named `name` (or,
/// for a proxy, `name-proxy`): what the debugging commands read.
pub async fn admin_of(control: Option<SocketAddr>, name: &str) -> anyhow::Result<String> {
    let control = control::address(control)?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let rows = control::rows(&client, control).await?;
    find_admin(&rows, name).map_err(|e| anyhow::anyhow!("the mesh at {control} {e}"))
}

/// The admin address of the row named `name`, or `name-proxy`: an app's
/// row has no admin port, so `reviews-v1` means its proxy.
pub fn find_admin(rows: &[Row], name: &str) -> anyhow::Result<String> {
    let proxy = format!("{name}-proxy");
    let admin = |row: &Row| {
        row.ports
            .iter()
            .find(|(what, _)| what == "admin")
            .map(|(_, addr)| addr.clone())
    };
    [name, proxy.as_str()]
        .iter()
        .find_map(|n| rows.iter().filter(|r| r.name == *n).find_map(admin))
        .ok_or_else(|| {
            let names: Vec<&str> = rows
                .iter()
                .filter(|r| admin(r).is_some())
                .map(|r| r.name.as_str())
                .collect();
            anyhow::anyhow!(
                "runs no {name:?} with an admin port; it runs {}",
                names.join(", ")
            )
        })
}

/// The body of an admin page, an error naming the URL when it cannot be
/// had.
pub async fn page(url: &str) -> anyhow::Result<String> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let status = response.status();
    let body = response.text().await?;
    anyhow::ensure!(status.is_success(), "{url}: {status}: {}", body.trim());
    Ok(body)
}
