//! `meshctl proxy-status`: what Pilot sent each connected proxy and whether
//! the proxy took it, per xDS type, like `istioctl proxy-status`. It reads
//! Pilot's `/debug/syncz`.

use clap::Args;
use mesh_api::xds;
use serde_json::Value;

#[derive(Debug, Args)]
pub struct ProxyStatusArgs {
    #[command(flatten)]
    pub pilot: crate::admin::PilotArgs,
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
    let pilot = args.pilot.admin().await?;
    let syncz = crate::admin::page(&format!("http://{pilot}/debug/syncz")).await?;
    let proxies: Vec<Value> = serde_json::from_str(&syncz)?;
    // As wide as the longest node id.
    let width = proxies
        .iter()
        .filter_map(|p| p["node"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(0)
        .max(4);
    println!(
        "{:<width$}  {:<10} {:<10} {:<10} {:<10}",
        "NAME", TYPES[0].0, TYPES[1].0, TYPES[2].0, TYPES[3].0
    );
    for proxy in &proxies {
        let states: Vec<String> = TYPES
            .iter()
            .map(|(_, t)| state(proxy["types"].get(*t)))
            .collect();
        println!(
            "{:<width$}  {:<10} {:<10} {:<10} {:<10}",
            proxy["node"].as_str().unwrap_or_default(),
            states[0],
            states[1],
            states[2],
            states[3]
        );
    }
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
