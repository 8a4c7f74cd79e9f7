use clap::Parser;
use component::{Admin, cli::CommonArgs};

/// Galley: config ingestion and validation, served over MCP.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    galley: galley::GalleyArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.common.init_logging();
    let shutdown = component::shutdown::on_signal();
    let admin = Admin::new("galley");
    let mcp = tokio::net::TcpListener::bind(cli.galley.mcp_addr).await?;
    let work = galley::run(cli.galley, mcp, admin.clone(), shutdown.clone());
    component::run_with_admin(
        &admin,
        cli.common
            .admin_addr_or(component::ports::CONTROL_PLANE_ADMIN),
        shutdown,
        work,
    )
    .await
}
