use clap::Parser;
use component::{Admin, cli::CommonArgs, ports};

/// Pilot: the service model and the xDS server.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    pilot: pilot::PilotArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.common.init_logging();
    let shutdown = component::shutdown::on_signal();
    let admin = Admin::new("pilot");
    let work = pilot::run(cli.pilot, admin.clone(), shutdown.clone());
    component::run_with_admin(
        &admin,
        cli.common.admin_addr_or(ports::CONTROL_PLANE_ADMIN),
        shutdown,
        work,
    )
    .await
}
