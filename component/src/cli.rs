//! Flags every component binary takes.

use std::net::SocketAddr;

use clap::Args;

use crate::logging::LogFormat;

#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Address of the admin server (`/healthz`, `/ready`, `/metrics`, `/debug/*`).
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], crate::ports::CONTROL_PLANE_ADMIN)))]
    pub admin_addr: SocketAddr,
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, in `RUST_LOG` syntax; `RUST_LOG` wins when set.
    #[arg(long, env = "MESH_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl CommonArgs {
    pub fn init_logging(&self) {
        crate::logging::init(self.log_format, &self.log_level);
    }
}
