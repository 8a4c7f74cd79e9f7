#[tokio::main]
async fn main() -> anyhow::Result<()> {
    component::main_of(
        "galley",
        "Galley: config ingestion and validation, served over MCP.",
        component::ports::CONTROL_PLANE_ADMIN,
        galley::run,
    )
    .await
}
