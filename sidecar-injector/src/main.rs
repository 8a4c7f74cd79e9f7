#[tokio::main]
async fn main() -> anyhow::Result<()> {
    component::main_of(
        "sidecar-injector",
        "The sidecar injector: a mutating admission webhook that adds the proxy to pods.",
        component::ports::CONTROL_PLANE_ADMIN,
        sidecar_injector::run,
    )
    .await
}
