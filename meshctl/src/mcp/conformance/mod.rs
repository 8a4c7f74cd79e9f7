//! `meshctl mcp conformance`: checks another implementation against the
//! MCP rules of WIRE.md over a real connection and prints a pass/fail table,
//! one row per check.
//!
//! Against a source (`--source ADDR --dir DIR`) it plays a sink and causes
//! changes by editing files in DIR, which the source must be serving.
//! Against a sink (`--sink ADDR`) it dials the sink's `ResourceSink`
//! service and plays a source. Checks that something is *not* sent wait for
//! `--quiet-ms`; every other wait is bounded by `--timeout-ms`.

mod probe;
mod sink;
mod source;

use std::{fmt, path::PathBuf, time::Duration};

use clap::Args;

#[derive(Debug, Args)]
pub struct ConformanceArgs {
    /// An MCP source to check (`host:port`); needs `--dir`.
    #[arg(
        long,
        required_unless_present = "sink",
        conflicts_with = "sink",
        requires = "dir"
    )]
    pub source: Option<String>,
    /// The directory the source serves; the checks add, edit and remove one
    /// file in it (`zz-mcp-conformance.yaml`) and leave it as they found it.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// An MCP sink serving `ResourceSink` to check (`host:port`).
    #[arg(long)]
    pub sink: Option<String>,
    /// How long to watch for messages that must not come.
    #[arg(long, default_value_t = 1000)]
    pub quiet_ms: u64,
    /// Longest wait for a message that must come.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

/// Outcome of one check.
pub enum Outcome {
    Pass(String),
    Fail(String),
}

pub struct Row {
    pub rule: &'static str,
    pub check: &'static str,
    pub outcome: Outcome,
}

/// The table of checks, printed as it is filled.
#[derive(Default)]
pub struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn record(&mut self, rule: &'static str, check: &'static str, outcome: Result<String, String>) {
        let outcome = match outcome {
            Ok(note) => Outcome::Pass(note),
            Err(why) => Outcome::Fail(why),
        };
        let row = Row {
            rule,
            check,
            outcome,
        };
        println!("{row}");
        self.rows.push(row);
    }

    pub fn failures(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Fail(_)))
            .count()
    }
}

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (verdict, note) = match &self.outcome {
            Outcome::Pass(note) => ("PASS", note),
            Outcome::Fail(why) => ("FAIL", why),
        };
        write!(
            f,
            "{verdict}  rule {:<2} {:<58} {note}",
            self.rule, self.check
        )
    }
}

/// Runs the checks; the error counts failures, for a non-zero exit.
pub async fn run(args: ConformanceArgs) -> anyhow::Result<()> {
    let timing = probe::Timing {
        quiet: Duration::from_millis(args.quiet_ms),
        timeout: Duration::from_millis(args.timeout_ms),
    };
    println!("{:<4}  {:<8} {:<58} NOTE", "", "RULE", "CHECK");
    let report = match (&args.source, &args.sink) {
        (Some(source), _) => {
            let dir = args
                .dir
                .as_deref()
                .expect("clap requires --dir with --source");
            source::check(source, dir, timing).await?
        }
        (None, Some(sink)) => sink::check(sink, timing).await?,
        (None, None) => unreachable!("clap requires --source or --sink"),
    };
    let failed = report.failures();
    println!("{} passed, {} failed", report.rows.len() - failed, failed);
    anyhow::ensure!(failed == 0, "{failed} conformance check(s) failed");
    Ok(())
}
