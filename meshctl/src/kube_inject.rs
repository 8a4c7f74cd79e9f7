//! `meshctl kube-inject`: the injector's webhook, offline.

use std::{io::Read, path::PathBuf};

use clap::Args;

#[derive(Debug, Args)]
pub struct KubeInjectArgs {
    /// Kubernetes YAML to inject (`-` for stdin).
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// The injector config (policy, values, template); the built-in
    /// default, which the manifests ship, when absent.
    #[arg(long)]
    pub injector_config: Option<PathBuf>,
}

pub fn run(args: KubeInjectArgs) -> anyhow::Result<()> {
    let injector = sidecar_injector::load(args.injector_config.as_deref())?;
    let text = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        text
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?
    };
    let out = sidecar_injector::kube_inject::kube_inject(&text, &injector)
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", args.file.display()))?;
    print!("{out}");
    Ok(())
}
