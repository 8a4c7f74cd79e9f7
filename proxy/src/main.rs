#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // `proxy init` is the init container's job, not the proxy's.
    if std::env::args().nth(1).as_deref() == Some("init") {
        use clap::Parser;
        let args = proxy::init::InitArgs::parse_from(std::env::args().skip(1));
        return proxy::init::run(&args);
    }
    component::main_of(
        "proxy",
        "The sidecar proxy: the data plane, configured by xDS v3. `proxy init --help` for the iptables setup.",
        component::ports::PROXY_ADMIN,
        proxy::run,
    )
    .await
}
