#[tokio::main]
async fn main() -> anyhow::Result<()> {
    component::main_of(
        "mixer",
        "Mixer: policy checks and telemetry.",
        component::ports::CONTROL_PLANE_ADMIN,
        mixer::run,
    )
    .await
}
