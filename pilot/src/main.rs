#[tokio::main]
async fn main() -> anyhow::Result<()> {
    component::main_of(
        "pilot",
        "Pilot: the service model and the xDS server.",
        component::ports::CONTROL_PLANE_ADMIN,
        pilot::run,
    )
    .await
}
