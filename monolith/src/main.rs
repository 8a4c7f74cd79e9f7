//! The monolith topology: every control-plane component in one process,
//! each running its own code with its own flags and admin port, the same
//! as its binary, and connected to Galley by MCP over in-memory pipes
//! (`--mcp-addr mem://galley`, `--mcp-server mem://galley`) instead of
//! sockets. One component stopping stops the process.
//!
//! `monolith galley ARGS -- pilot ARGS -- mixer ARGS -- ...`: each part is
//! a component's name and the flags its binary takes.

use std::{future::Future, pin::Pin};

use component::{CancellationToken, parse_component, ports::CONTROL_PLANE_ADMIN, serve_component};
use tracing::Instrument;

type Work = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// A component's flags, parsed as its binary parses them, and its work.
fn component(
    part: &[String],
    shutdown: &CancellationToken,
) -> anyhow::Result<(&'static str, component::cli::CommonArgs, Work)> {
    let name = part.first().map(String::as_str).unwrap_or_default();
    let shutdown = shutdown.clone();
    macro_rules! hosted {
        ($name:literal, $run:path) => {{
            // A bad flag ends the process as it would end the binary.
            let (common, args) =
                parse_component($name, concat!($name, ", hosted by the monolith"), part)
                    .unwrap_or_else(|e| e.exit());
            let work = serve_component(
                $name,
                CONTROL_PLANE_ADMIN,
                common.clone(),
                args,
                $run,
                shutdown,
            );
            ($name, common, Box::pin(work) as Work)
        }};
    }
    Ok(match name {
        "galley" => hosted!("galley", galley::run),
        "pilot" => hosted!("pilot", pilot::run),
        "mixer" => hosted!("mixer", mixer::run),
        "citadel" => hosted!("citadel", citadel::run),
        "sidecar-injector" => hosted!("sidecar-injector", sidecar_injector::run),
        other => anyhow::bail!(
            "{other:?} is not a component: galley, pilot, mixer, citadel or sidecar-injector"
        ),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() || (argv.len() == 1 && matches!(argv[0].as_str(), "--help" | "-h")) {
        println!(
            "usage: monolith COMPONENT [FLAGS] [-- COMPONENT [FLAGS]]...\n\nEvery control-plane component in one process; each takes its binary's flags."
        );
        return Ok(());
    }
    let shutdown = component::shutdown::on_signal();
    // One process, one service in the traces: its components are told
    // apart by their spans' scope.
    component::trace::init("monolith")?;
    let mut parts = Vec::new();
    for part in argv.split(|a| a == "--") {
        parts.push(component(part, &shutdown)?);
    }
    // One process, one log: the first component's logging flags.
    parts[0].1.init_logging();
    let mut running = tokio::task::JoinSet::new();
    for (name, _, work) in parts {
        running.spawn(
            async move { (name, work.await) }.instrument(tracing::info_span!("component", name)),
        );
    }
    // The first to stop, for whatever reason, stops the rest.
    let mut outcome = Ok(());
    while let Some(joined) = running.join_next().await {
        shutdown.cancel();
        let (name, result) = joined?;
        if let Err(e) = result
            && outcome.is_ok()
        {
            outcome = Err(e.context(format!("{name} failed")));
        }
    }
    component::trace::flush();
    outcome
}
