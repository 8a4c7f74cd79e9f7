//! The `main` of every component binary, so each `main.rs` is one call.

use std::future::Future;

use clap::{Args, CommandFactory, FromArgMatches, Parser};
use tokio_util::sync::CancellationToken;

use crate::{Admin, cli::CommonArgs};

/// A component's command line: the common flags plus its own.
#[derive(Debug, Parser)]
#[command(version)]
struct ComponentCli<A: Args> {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    args: A,
}

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
    let matches = ComponentCli::<A>::command()
        .name(name)
        .about(about)
        .get_matches();
    let cli = ComponentCli::<A>::from_arg_matches(&matches)?;
    cli.common.init_logging();
    let shutdown = crate::shutdown::on_signal();
    let admin = Admin::new(&name.replace('-', "_"));
    let work = run(cli.args, admin.clone(), shutdown.clone());
    crate::run_with_admin(
        &admin,
        cli.common.admin_addr_or(default_admin_port),
        shutdown,
        work,
    )
    .await
}
