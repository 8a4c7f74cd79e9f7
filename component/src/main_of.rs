//! The `main` of every component binary, so each `main.rs` is one call.

use std::future::Future;

use clap::{Args, CommandFactory, FromArgMatches};
use tokio_util::sync::CancellationToken;

use crate::{
    Admin,
    cli::{Cli, CommonArgs},
};

/// Parses flags, starts logging and signal handling, and runs `run` beside
/// the admin server (on `default_admin_port` unless `--admin-addr` says
/// otherwise) until SIGTERM or Ctrl-C. Metric names start with `name`.
pub async fn main_of<A, F, Fut>(
    name: &'static str,
    about: &'static str,
    default_admin_port: u16,
    run: F,
) -> anyhow::Result<()>
where
    A: Args,
    F: FnOnce(A, Admin, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let (common, args) = match parse_component::<A>(name, about, std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(e) => e.exit(),
    };
    common.init_logging();
    let shutdown = crate::shutdown::on_signal();
    let served = serve_component(name, default_admin_port, common, args, run, shutdown).await;
    crate::trace::flush();
    served
}

/// A component's flags, parsed from `argv` (its first item is the
/// program name) as its binary parses them.
pub fn parse_component<A: Args>(
    name: &'static str,
    about: &'static str,
    argv: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
) -> Result<(CommonArgs, A), clap::Error> {
    let matches = Cli::<A>::command()
        .name(name)
        .about(about)
        .try_get_matches_from(argv)?;
    let cli = Cli::<A>::from_arg_matches(&matches)?;
    Ok((cli.common, cli.args))
}

/// Runs a component beside its own admin server until `shutdown`: what a
/// component binary does after parsing, and what the monolith does for
/// each component it hosts.
pub async fn serve_component<A, F, Fut>(
    name: &'static str,
    default_admin_port: u16,
    common: CommonArgs,
    args: A,
    run: F,
    shutdown: CancellationToken,
) -> anyhow::Result<()>
where
    F: FnOnce(A, Admin, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let admin = Admin::new(&name.replace('-', "_"));
    let work = run(args, admin.clone(), shutdown.clone());
    crate::run_with_admin(
        &admin,
        common.admin_addr_or(default_admin_port),
        shutdown,
        work,
    )
    .await
}
