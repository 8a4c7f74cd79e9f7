#[tokio::main]
async fn main() -> anyhow::Result<()> {
    component::main_of(
        "citadel",
        "Citadel: the CA that issues every workload its SPIFFE identity.",
        component::ports::CONTROL_PLANE_ADMIN,
        citadel::run,
    )
    .await
}
