//! Flags every component binary takes, a component's whole command line
//! ([`Cli`]), and command lines built from argument types ([`Flags`]).

use std::{fmt::Display, marker::PhantomData, net::SocketAddr};

use clap::{ArgAction, Args, CommandFactory, Parser};

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

/// Binds `addr`, the value of flag `--{flag}`; an error names both.
pub async fn bind(flag: &str, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind --{flag} {addr}: {e}"))
}

/// A component's command line: the common flags plus its own.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Cli<A: Args> {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub args: A,
}

/// A command line for the program whose flags are `T`, built flag by flag
/// through [`flags!`](crate::flags), which names each flag by its field:
/// a flag renamed or removed fails to compile where a command line is
/// built, not when the process starts.
pub struct Flags<T> {
    command: clap::Command,
    argv: Vec<String>,
    program: PhantomData<T>,
}

impl<T: CommandFactory> Flags<T> {
    #[doc(hidden)]
    pub fn new() -> Self {
        Self {
            command: T::command(),
            argv: Vec::new(),
            program: PhantomData,
        }
    }

    /// Adds the flag of field `field` (its path, as `stringify!` writes
    /// it; the last name is the flag's id) with `value`. A switch is
    /// given bare when `value` is `true` and left out when it is `false`.
    #[doc(hidden)]
    pub fn push(mut self, field: &str, value: impl Display) -> Self {
        let id = field.rsplit('.').next().unwrap_or(field).trim();
        let arg = self
            .command
            .get_arguments()
            .find(|a| a.get_id() == id)
            .unwrap_or_else(|| panic!("{id} is a field of the arguments but not a flag"));
        let long = arg
            .get_long()
            .unwrap_or_else(|| panic!("flag {id} has no long name"));
        let value = value.to_string();
        match arg.get_action() {
            ArgAction::SetTrue if value == "true" => self.argv.push(format!("--{long}")),
            ArgAction::SetTrue if value == "false" => {}
            _ => self.argv.push(format!("--{long}={value}")),
        }
        self
    }

    /// Adds the flags of `more`, built apart (a flag given only sometimes).
    pub fn extend(mut self, more: Self) -> Self {
        self.argv.extend(more.argv);
        self
    }

    /// The command line, checked by parsing it as the program does, so
    /// that a value it would refuse is an error before it starts.
    pub fn build(self) -> Result<Vec<String>, clap::Error> {
        let argv = std::iter::once(self.command.get_name().to_string()).chain(self.argv.clone());
        self.command.try_get_matches_from(argv)?;
        Ok(self.argv)
    }
}

impl<A: Args> Flags<Cli<A>> {
    /// Adds `--admin-addr`, which every component takes.
    pub fn admin_addr(self, addr: SocketAddr) -> Self {
        let _names_the_field = |c: &CommonArgs| c.admin_addr;
        self.push("admin_addr", addr)
    }

    /// Adds `--log-level`, which every component takes.
    pub fn log_level(self, filter: &str) -> Self {
        let _names_the_field = |c: &CommonArgs| c.log_level.len();
        self.push("log_level", filter)
    }
}

/// A command line for the program whose flags are `$args`, from
/// `field: value` pairs. A field of a flattened group is named by its
/// path (`common.admin_addr`); a repeated flag, by repeating its field.
/// Values are anything `Display`; [`Flags::build`] checks them.
#[macro_export]
macro_rules! flags {
    ($args:ty { $( $($field:ident).+ : $value:expr ),* $(,)? }) => {{
        // Names every field, so that a flag renamed or removed fails to
        // compile here.
        #[allow(dead_code)]
        fn fields(a: &$args) {
            $( let _ = &a.$($field).+; )*
        }
        $crate::cli::Flags::<$args>::new() $( .push(stringify!($($field).+), $value) )*
    }};
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[derive(Debug, Clone, Args)]
    struct Example {
        #[arg(long)]
        config_dir: Option<PathBuf>,
        #[arg(long = "sink-address")]
        sink_addresses: Vec<String>,
        #[arg(long)]
        kube: bool,
        #[arg(long, default_value_t = 1)]
        replicas: u32,
    }

    fn parse(argv: &[String]) -> Cli<Example> {
        Cli::<Example>::parse_from(std::iter::once("example".to_string()).chain(argv.to_vec()))
    }

    #[test]
    fn a_command_line_parses_back_to_the_values_it_was_built_from() {
        let admin: SocketAddr = "127.0.0.1:15014".parse().unwrap();
        let argv = crate::flags!(Cli<Example> {
            common.admin_addr: admin,
            common.log_level: "warn",
            args.config_dir: "/etc/mesh".to_string(),
            args.sink_addresses: "a:1",
            args.sink_addresses: "-b:2",
            args.kube: true,
        })
        .build()
        .unwrap();
        assert_eq!(
            argv,
            [
                "--admin-addr=127.0.0.1:15014",
                "--log-level=warn",
                "--config-dir=/etc/mesh",
                "--sink-address=a:1",
                "--sink-address=-b:2",
                "--kube",
            ]
        );
        let cli = parse(&argv);
        assert_eq!(cli.common.admin_addr, Some(admin));
        assert_eq!(cli.args.sink_addresses, ["a:1", "-b:2"]);
        assert!(cli.args.kube);
        assert_eq!(cli.args.replicas, 1);
    }

    #[test]
    fn a_switch_set_false_is_left_out() {
        let argv = crate::flags!(Cli<Example> { args.kube: false })
            .build()
            .unwrap();
        assert!(argv.is_empty());
    }

    #[test]
    fn a_value_the_program_refuses_is_an_error_before_it_starts() {
        let error = crate::flags!(Cli<Example> { args.replicas: "many" })
            .build()
            .unwrap_err();
        assert!(error.to_string().contains("--replicas"), "{error}");
    }
}
