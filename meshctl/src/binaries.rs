//! Finding the component binaries `meshctl` starts: next to `meshctl`
//! itself unless a directory is given.

use std::path::{Path, PathBuf};

/// The directory holding the component binaries.
pub fn dir(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir.to_path_buf());
    }
    let exe = std::env::current_exe()?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// The path of binary `name` in `dir`, or an error saying how to build it.
pub fn path(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not found; build every component first (`cargo build --workspace`) or pass --bin-dir",
        path.display()
    );
    Ok(path)
}
