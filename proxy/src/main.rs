#[tokio::main]
async fn main() -> anyhow::Result<()> {
    component::main_of(
        "proxy",
        "The sidecar proxy: the data plane, configured by xDS v3.",
        component::ports::PROXY_ADMIN,
        proxy::run,
    )
    .await
}
