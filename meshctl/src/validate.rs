//! `meshctl validate -f FILE...`: the checks Galley applies, offline. Each
//! file (or every config file below a directory) is parsed and validated,
//! references between the given objects included; `--mesh-config FILE`
//! reads a mesh config file as Galley and Pilot read it.

use std::path::PathBuf;

use clap::Args;
use galley::validation;
use mesh_api::object::ConfigObject;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Files or directories of config YAML.
    #[arg(short = 'f', long = "filename", required_unless_present = "mesh_config", num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// A mesh config file (MeshConfig YAML).
    #[arg(long)]
    pub mesh_config: Option<PathBuf>,
}

/// Prints every problem and every warning (what the mesh would serve but
/// not honour); an error (non-zero exit) if there was any problem.
pub fn run(args: ValidateArgs) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut objects = Vec::new();
    if let Some(path) = &args.mesh_config {
        match mesh_api::mesh::load(path) {
            Ok(loaded) => warnings.extend(
                loaded
                    .warnings
                    .iter()
                    .map(|w| format!("{}: warning: {w}", path.display())),
            ),
            Err(e) => problems.push(e),
        }
    }
    for path in galley::dir::config_files_in(&args.files, &mut problems) {
        match galley::dir::read_objects(&path) {
            Ok(found) => objects.extend(found),
            Err(e) => problems.push(e),
        }
    }
    let refs: Vec<&ConfigObject> = objects.iter().collect();
    for (i, found) in validation::validate_all(&refs) {
        for p in found {
            let line = format!("{}: {p}", refs[i].location);
            if p.is_error() {
                problems.push(line);
            } else {
                warnings.push(line);
            }
        }
    }
    for p in problems.iter().chain(&warnings) {
        println!("{p}");
    }
    anyhow::ensure!(
        problems.is_empty(),
        "{} problem(s) in {} object(s) checked",
        problems.len(),
        objects.len()
    );
    match warnings.len() {
        0 => println!("{} object(s) valid", objects.len()),
        n => println!(
            "{} object(s) valid, {n} warning(s): served, but not honoured as written",
            objects.len()
        ),
    }
    Ok(())
}
