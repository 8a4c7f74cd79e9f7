//! `meshctl mcp conformance`: checks another implementation against the
//! MCP rules of WIRE.md over a real connection and prints a pass/fail table,
//! one row per check.
//!
//! Against a source (`--source ADDR`) it plays a sink. With `--dir DIR`,
//! the directory the source serves, it causes changes by editing a file
//! there; without it (a source whose config this tool cannot edit, such as
//! one reading Kubernetes), the checks that need a change are SKIPPED and
//! say why. Against a sink it plays a source: `--sink ADDR` dials the
//! sink's `ResourceSink`; `--listen ADDR` serves `ResourceSource` for a sink
//! that dials (Pilot, Mixer, Istio's `pilot-discovery`), withholding its
//! response headers until the sink has asked, as a grpc-go source does.
//! Checks that something is *not* sent wait for `--quiet-ms`; every other
//! wait is bounded by `--timeout-ms`.

mod probe;
mod sink;
mod source;

use std::{fmt, path::PathBuf, time::Duration};

use clap::Args;

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("peer").required(true).args(["source", "sink", "listen"])))]
pub struct ConformanceArgs {
    /// An MCP source to check (`host:port`).
    #[arg(long)]
    pub source: Option<String>,
    /// The directory the source serves; the checks add, edit and remove one
    /// file in it (`zz-mcp-conformance.yaml`) and leave it as they found it.
    #[arg(long, requires = "source")]
    pub dir: Option<PathBuf>,
    /// Without `--dir`: the collection to check the source on.
    #[arg(
        long,
        requires = "source",
        conflicts_with = "dir",
        default_value = "istio/networking/v1alpha3/virtualservices"
    )]
    pub collection: String,
    /// An MCP sink serving `ResourceSink` to check (`host:port`).
    #[arg(long)]
    pub sink: Option<String>,
    /// Serve `ResourceSource` here and check the sink that dials it.
    #[arg(long)]
    pub listen: Option<String>,
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
    /// Not run; why.
    Skipped(String),
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

    fn skip(&mut self, rule: &'static str, check: &'static str, why: &str) {
        let row = Row {
            rule,
            check,
            outcome: Outcome::Skipped(why.to_string()),
        };
        println!("{row}");
        self.rows.push(row);
    }

    fn count(&self, which: fn(&Outcome) -> bool) -> usize {
        self.rows.iter().filter(|r| which(&r.outcome)).count()
    }

    pub fn failures(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Fail(_)))
    }
}

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (verdict, note) = match &self.outcome {
            Outcome::Pass(note) => ("PASS", note),
            Outcome::Fail(why) => ("FAIL", why),
            Outcome::Skipped(why) => ("SKIP", why),
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
    let report = match (&args.source, &args.sink, &args.listen) {
        (Some(source), ..) => match &args.dir {
            Some(dir) => source::check(source, source::Changes::Dir(dir), timing).await?,
            None => source::check(source, source::Changes::None(&args.collection), timing).await?,
        },
        (None, Some(sink), _) => sink::check_dialing(sink, timing).await?,
        (None, None, Some(listen)) => sink::check_listening(listen, timing).await?,
        (None, None, None) => unreachable!("clap requires --source, --sink or --listen"),
    };
    let failed = report.failures();
    let skipped = report.count(|o| matches!(o, Outcome::Skipped(_)));
    let passed = report.rows.len() - failed - skipped;
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    anyhow::ensure!(failed == 0, "{failed} conformance check(s) failed");
    Ok(())
}
