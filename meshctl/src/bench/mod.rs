//! `meshctl bench`: benchmarks that measure ours against a baseline in the
//! same run and print their figures as JSON.

pub mod galley;
pub mod mcp;
pub mod pilot;

use std::{path::Path, time::Duration};

/// Milliseconds with two decimals.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 1e2
}

/// Prints the figures, and writes them to `out` too when given.
fn report(figures: &serde_json::Value, out: Option<&Path>) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(figures)?;
    println!("{text}");
    if let Some(out) = out {
        std::fs::write(out, format!("{text}\n"))?;
    }
    Ok(())
}
