use clap::Parser;
use component::{Admin, cli::CommonArgs, ports};

/// Mixer: policy checks and telemetry.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    mixer: mixer::MixerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.common.init_logging();
    let shutdown = component::shutdown::on_signal();
    let admin = Admin::new("mixer");
    let work = mixer::run(cli.mixer, admin.clone(), shutdown.clone());
    component::run_with_admin(
        &admin,
        cli.common.admin_addr_or(ports::CONTROL_PLANE_ADMIN),
        shutdown,
        work,
    )
    .await
}
