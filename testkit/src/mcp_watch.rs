//! `meshctl mcp watch` as a test's MCP sink: what it prints, read back.

use std::path::Path;

use serde_json::Value;

use crate::Proc;

/// A `meshctl mcp watch` of `collections` at `server`, printing a JSON line
/// per update; `full_state` asks for whole states, not incremental updates.
pub fn start(server: &str, collections: &[&str], full_state: bool) -> Proc {
    let collections = collections.join(",");
    let mut args = vec![
        "mcp",
        "watch",
        "--server",
        server,
        "--output",
        "json",
        "--collections",
        &collections,
    ];
    if full_state {
        args.push("--full-state");
    }
    Proc::start("meshctl", &args)
}

/// The next update the watcher prints for `collection`.
pub async fn next_update(watch: &mut Proc, collection: &str) -> Value {
    loop {
        let line = watch.stdout_until("\"collection\"").await.pop().unwrap();
        let update: Value = serde_json::from_str(&line).unwrap();
        if update["collection"] == collection {
            return update;
        }
    }
}

/// The names of an update's resources, in order.
pub fn names(update: &Value) -> Vec<&str> {
    update["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect()
}

/// The body of the resource `name` in an update.
pub fn body<'a>(update: &'a Value, name: &str) -> &'a Value {
    let resources = update["resources"].as_array().unwrap();
    &resources.iter().find(|r| r["name"] == name).unwrap()["body"]
}

/// Writes a config file as editors do: a new file renamed over the old.
pub fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}
