use clap::Parser;
use component::{Admin, cli::CommonArgs, ports};

/// The sidecar proxy: the mesh's data plane, configured by xDS v3.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.common.init_logging();
    let shutdown = component::shutdown::on_signal();
    let admin = Admin::new("proxy");
    tracing::warn!("only the admin port runs so far; the rest comes with issue 7");
    let idle = shutdown.clone().cancelled_owned();
    let work = async {
        idle.await;
        Ok(())
    };
    component::run_with_admin(
        &admin,
        cli.common.admin_addr_or(ports::PROXY_ADMIN),
        shutdown,
        work,
    )
    .await
}
