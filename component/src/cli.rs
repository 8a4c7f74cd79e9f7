//! Flags every component binary takes.

use std::net::SocketAddr;

use clap::Args;

use crate::logging::LogFormat;

#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Address of the admin server (`/healthz`, `/ready`, `/metrics`,
    /// `/debug/*`); port 15014 (the proxy: 15000) on all interfaces if unset.
    #[arg(long, env = "MESH_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, in `RUST_LOG` syntax; `RUST_LOG` wins when set.
    #[arg(long, env = "MESH_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl CommonArgs {
    /// The admin address, or `default_port` on all interfaces.
    pub fn admin_addr_or(&self, default_port: u16) -> SocketAddr {
        self.admin_addr
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], default_port)))
    }

    pub fn init_logging(&self) {
        crate::logging::init(self.log_format, &self.log_level);
    }
}
