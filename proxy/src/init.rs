//! `proxy init`: the iptables redirection that puts the proxy in the path
//! of a pod's traffic (Kubernetes mode), as the injector's `istio-init`
//! container runs it. Inbound TCP goes to the inbound capture port (15006),
//! outbound TCP to the outbound port (15001), except the proxy's own
//! traffic (by UID and GID), loopback, and the ports and ranges excluded.
//! The rules are written for `iptables-restore`, so they apply as one
//! transaction: a pod is never half redirected. `--dry-run` prints them.

use std::{io::Write, net::Ipv4Addr, process::Stdio};

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Redirect,
    Tproxy,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "proxy init",
    about = "Write the iptables rules that redirect a pod's traffic through its proxy."
)]
pub struct InitArgs {
    /// Where outbound traffic is redirected (the proxy's outbound listener).
    #[arg(long, default_value_t = component::ports::PROXY_OUTBOUND)]
    pub proxy_port: u16,
    /// Where inbound traffic is redirected.
    #[arg(long, default_value_t = component::ports::PROXY_INBOUND)]
    pub inbound_capture_port: u16,
    /// The UID the proxy runs as; its own traffic is not redirected.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The GID the proxy runs as (the UID when not given).
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    #[arg(long, value_enum, default_value_t = Mode::Redirect)]
    pub mode: Mode,
    /// Inbound ports redirected: `*` for all, or a comma-separated list.
    #[arg(long, default_value = "*")]
    pub inbound_ports: String,
    /// Inbound ports left alone when all are redirected.
    #[arg(long, default_value = "")]
    pub exclude_inbound_ports: String,
    /// Outbound destinations redirected: `*`, or comma-separated CIDRs.
    #[arg(long, default_value = "*")]
    pub include_outbound_ip_ranges: String,
    /// Outbound destinations left alone, comma-separated CIDRs.
    #[arg(long, default_value = "")]
    pub exclude_outbound_ip_ranges: String,
    /// Outbound ports left alone.
    #[arg(long, default_value = "")]
    pub exclude_outbound_ports: String,
    /// Print the rules instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
}

fn list(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn ports(text: &str, flag: &str) -> anyhow::Result<Vec<u16>> {
    list(text)
        .map(|p| {
            p.parse::<u16>()
                .map_err(|_| anyhow::anyhow!("--{flag}: {p:?} is not a port number"))
        })
        .collect()
}

fn cidrs(text: &str, flag: &str) -> anyhow::Result<Vec<String>> {
    list(text)
        .map(|c| {
            let (ip, len) = c.split_once('/').unwrap_or((c, "32"));
            let valid = ip.parse::<Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32);
            anyhow::ensure!(valid, "--{flag}: {c:?} is not an IPv4 CIDR range");
            Ok(format!("{ip}/{len}"))
        })
        .collect()
}

/// The rules, in `iptables-restore` form.
pub fn rules(args: &InitArgs) -> anyhow::Result<String> {
    anyhow::ensure!(
        args.mode == Mode::Redirect,
        "--mode tproxy is not supported; use redirect"
    );
    let gid = args.proxy_gid.unwrap_or(args.proxy_uid);
    let mut r = vec![
        "*nat".to_string(),
        ":ISTIO_INBOUND - [0:0]".into(),
        ":ISTIO_IN_REDIRECT - [0:0]".into(),
        ":ISTIO_OUTPUT - [0:0]".into(),
        ":ISTIO_REDIRECT - [0:0]".into(),
        format!(
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            args.proxy_port
        ),
        format!(
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            args.inbound_capture_port
        ),
    ];
    // Inbound.
    let excluded_in = ports(&args.exclude_inbound_ports, "exclude-inbound-ports")?;
    if args.inbound_ports.trim() == "*" {
        r.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".into());
        // SSH stays reachable, as Istio leaves it.
        for port in std::iter::once(22).chain(excluded_in) {
            r.push(format!("-A ISTIO_INBOUND -p tcp --dport {port} -j RETURN"));
        }
        r.push("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".into());
    } else {
        let included = ports(&args.inbound_ports, "inbound-ports")?;
        if !included.is_empty() {
            r.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".into());
        }
        for port in included {
            r.push(format!(
                "-A ISTIO_INBOUND -p tcp --dport {port} -j ISTIO_IN_REDIRECT"
            ));
        }
    }
    // Outbound.
    r.push("-A OUTPUT -p tcp -j ISTIO_OUTPUT".into());
    for port in ports(&args.exclude_outbound_ports, "exclude-outbound-ports")? {
        r.push(format!("-A ISTIO_OUTPUT -p tcp --dport {port} -j RETURN"));
    }
    // An application calling its own pod address goes through the proxy.
    r.push("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -j ISTIO_REDIRECT".into());
    r.push(format!(
        "-A ISTIO_OUTPUT -m owner --uid-owner {} -j RETURN",
        args.proxy_uid
    ));
    r.push(format!(
        "-A ISTIO_OUTPUT -m owner --gid-owner {gid} -j RETURN"
    ));
    r.push("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN".into());
    for cidr in cidrs(
        &args.exclude_outbound_ip_ranges,
        "exclude-outbound-ip-ranges",
    )? {
        r.push(format!("-A ISTIO_OUTPUT -d {cidr} -j RETURN"));
    }
    if args.include_outbound_ip_ranges.trim() == "*" {
        r.push("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into());
    } else {
        for cidr in cidrs(
            &args.include_outbound_ip_ranges,
            "include-outbound-ip-ranges",
        )? {
            r.push(format!("-A ISTIO_OUTPUT -d {cidr} -j ISTIO_REDIRECT"));
        }
    }
    r.push("COMMIT".into());
    Ok(r.join("\n") + "\n")
}

/// Prints or applies the rules.
pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    let rules = rules(args)?;
    if args.dry_run {
        print!("{rules}");
        return Ok(());
    }
    let mut restore = std::process::Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("running iptables-restore: {e}"))?;
    restore
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("iptables-restore has no stdin"))?
        .write_all(rules.as_bytes())?;
    let status = restore.wait()?;
    anyhow::ensure!(status.success(), "iptables-restore failed: {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> InitArgs {
        InitArgs::parse_from([&["proxy init"], extra].concat())
    }

    #[test]
    fn everything_is_redirected_but_the_proxy_itself_by_default() {
        let rules = rules(&args(&[])).unwrap();
        for line in [
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
        ] {
            assert!(rules.lines().any(|l| l == line), "no {line:?} in\n{rules}");
        }
        assert!(rules.starts_with("*nat\n") && rules.ends_with("COMMIT\n"));
    }

    #[test]
    fn listed_ports_and_ranges_are_honoured_and_bad_ones_named() {
        let rules = rules(&args(&[
            "--inbound-ports",
            "9080,9443",
            "--include-outbound-ip-ranges",
            "10.0.0.0/8",
            "--exclude-outbound-ip-ranges",
            "10.96.0.1/32",
            "--exclude-outbound-ports",
            "3306",
        ]))
        .unwrap();
        for line in [
            "-A ISTIO_INBOUND -p tcp --dport 9443 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT -d 10.96.0.1/32 -j RETURN",
            "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT",
            "-A ISTIO_OUTPUT -p tcp --dport 3306 -j RETURN",
        ] {
            assert!(rules.lines().any(|l| l == line), "no {line:?} in\n{rules}");
        }
        assert!(!rules.contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
        let bad = super::rules(&args(&["--exclude-outbound-ip-ranges", "10.0.0/8x"])).unwrap_err();
        assert!(
            bad.to_string()
                .contains("--exclude-outbound-ip-ranges: \"10.0.0/8x\""),
            "{bad}"
        );
        let bad = super::rules(&args(&["--inbound-ports", "http"])).unwrap_err();
        assert!(
            bad.to_string().contains("--inbound-ports: \"http\""),
            "{bad}"
        );
    }
}
