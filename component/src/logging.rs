//! Logging through `tracing`: text by default, JSON with `--log-format json`,
//! levels from `--log-level` or `RUST_LOG`.

use std::{io::IsTerminal, sync::OnceLock};

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// Replaces the installed filter (the admin port's `/logging`).
type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

static RELOAD: OnceLock<Reload> = OnceLock::new();

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. Logs go to stderr so that commands whose
/// stdout is data (`meshctl mcp watch`) stay pipeable.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests, the monolith) keeps the first subscriber.
    match format {
        LogFormat::Text => {
            let builder = builder.with_env_filter(filter).with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() {
                let _ = RELOAD.set(Box::new(move |f| {
                    handle.reload(f).map_err(|e| e.to_string())
                }));
            }
        }
        LogFormat::Json => {
            let builder = builder
                .json()
                .with_env_filter(filter)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() {
                let _ = RELOAD.set(Box::new(move |f| {
                    handle.reload(f).map_err(|e| e.to_string())
                }));
            }
        }
    }
}

/// Sets what is logged from now on, as `--log-level` takes it
/// (`debug`, `info,proxy=debug`).
pub fn set_level(level: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(level).map_err(|e| format!("level {level:?}: {e}"))?;
    let reload = RELOAD
        .get()
        .ok_or("logging was not set up by this process")?;
    reload(filter)
}
