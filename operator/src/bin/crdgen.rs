//! `crdgen`: writes the CustomResourceDefinitions generated from the Rust types.
//!
//! `crdgen --out crds/` writes one YAML file per CRD; `crdgen --check crds/` exits 1
//! when the files there differ from what the types generate (CI runs it).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Writes or checks gpuvm's CRD YAML files.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Directory to write the CRDs into.
    #[arg(long, conflicts_with = "check")]
    out: Option<PathBuf>,
    /// Directory to compare against; exit 1 when stale.
    #[arg(long)]
    check: Option<PathBuf>,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let files = gpuvm_operator::crds::render()?;
    match (args.out, args.check) {
        (Some(dir), None) => {
            std::fs::create_dir_all(&dir)?;
            for (name, yaml) in files {
                std::fs::write(dir.join(name), yaml)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        (None, Some(dir)) => {
            let mut stale = Vec::new();
            for (name, yaml) in files {
                let path = dir.join(name);
                if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                    stale.push(path.display().to_string());
                }
            }
            if stale.is_empty() {
                println!("CRDs are up to date");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "stale CRDs: {}; run `cargo run -p gpuvm-operator --bin crdgen -- --out crds/`",
                    stale.join(", ")
                );
                Ok(ExitCode::FAILURE)
            }
        }
        _ => {
            for (name, yaml) in files {
                println!("# {name}\n---\n{yaml}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
