use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sample_app::run(sample_app::Args::parse()).await
}
