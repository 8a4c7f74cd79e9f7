//! `meshctl proxy-status`: what Pilot sent each connected proxy and whether
//! the proxy took it, per xDS type, like `istioctl proxy-status`. It reads
//! Pilot's `/debug/syncz`.

use std::net::SocketAddr;

use clap::Args;
use mesh_api::xds;
use serde_json::Value;

#[derive(Debug, Args)]
pub struct ProxyStatusArgs {
    /// Only the proxies whose name contains this, as `istioctl
    /// proxy-status <proxy>`.
    pub proxy: Option<String>,
    /// A Pilot's admin address; repeatable, as each Pilot replica serves
    /// proxies of its own. The running mesh's Pilot when absent.
    #[arg(long)]
    pub pilot: Vec<String>,
    /// The mesh's control address; the latest `meshctl up`'s when absent.
    #[arg(long, conflicts_with = "pilot")]
    pub control: Option<SocketAddr>,
}

/// The xDS types shown, with the column titles istioctl uses.
const TYPES: [(&str, &str); 4] = [
    ("CDS", xds::CLUSTER),
    ("LDS", xds::LISTENER),
    ("EDS", xds::ENDPOINT),
    ("RDS", xds::ROUTE),
];

/// SYNCED when the proxy ACKed what was last sent, STALE when it has not
/// (yet, or it NACKed), NOT SENT when nothing was sent.
pub fn state(status: Option<&Value>) -> String {
    let Some(status) = status else {
        return "NOT SENT".into();
    };
    let sent = status["sent_version"].as_str();
    let acked = status["acked_version"].as_str();
    match (sent, acked, status["last_nack"].as_str()) {
        (None, _, _) => "NOT SENT".into(),
        (Some(s), Some(a), _) if s == a => "SYNCED".into(),
        (Some(_), _, Some(nack)) => format!("STALE (NACK: {nack})"),
        (Some(_), _, None) => "STALE".into(),
    }
}

pub async fn run(args: ProxyStatusArgs) -> anyhow::Result<()> {
    // Each Pilot by the name its PILOT column shows.
    let pilots: Vec<(String, String)> = match args.pilot.is_empty() {
        true => {
            let admin = crate::admin::admin_of(args.control, "pilot").await?;
            vec![("pilot".into(), admin)]
        }
        false => args.pilot.iter().map(|a| (a.clone(), a.clone())).collect(),
    };
    let mut rows = Vec::new();
    for (name, admin) in &pilots {
        let syncz = crate::admin::page(&format!("http://{admin}/debug/syncz")).await?;
        let proxies: Vec<Value> = serde_json::from_str(&syncz)?;
        for proxy in &proxies {
            let node = proxy["node"].as_str().unwrap_or_default();
            if args.proxy.as_deref().is_some_and(|p| !node.contains(p)) {
                continue;
            }
            let mut row = vec![node.to_string()];
            row.extend(TYPES.iter().map(|(_, t)| state(proxy["types"].get(*t))));
            row.push(name.clone());
            row.push(proxy["version"].as_str().unwrap_or_default().to_string());
            rows.push(row);
        }
    }
    rows.sort();
    let headers = ["NAME", "CDS", "LDS", "EDS", "RDS", "PILOT", "VERSION"];
    print!("{}", crate::table::render(&headers, &rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn states_follow_what_was_sent_and_answered() {
        assert_eq!(state(None), "NOT SENT");
        assert_eq!(state(Some(&json!({"sent_version": null}))), "NOT SENT");
        assert_eq!(
            state(Some(&json!({"sent_version": "3", "acked_version": "3"}))),
            "SYNCED"
        );
        assert_eq!(
            state(Some(&json!({"sent_version": "4", "acked_version": "3"}))),
            "STALE"
        );
        assert_eq!(
            state(Some(
                &json!({"sent_version": "4", "acked_version": "3", "last_nack": "bad cluster"})
            )),
            "STALE (NACK: bad cluster)"
        );
    }
}
