//! `cargo xtask`: project automation run from the workspace root (benchmarks, the NAT lab,
//! deployment, release archives).

mod bench;
mod cli;
mod deploy;
mod dist;
mod lab;
mod process;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};

const HELP: &str = "\
Project automation. Usage: cargo xtask <task> [args]

Tasks:
  bench relay [options]   measure quic-relay against baselines from the same run
                          (`cargo xtask bench relay --help` for its options)
  bench mqproxy [options] mqproxy's UDP and TCP throughput against direct and shadowsocks
  lab <up|check|cleanup>  the NAT lab in network namespaces (`cargo xtask lab --help`)
  deploy --host USER@HOST build, upload and restart quic-relay (or mqproxy) over ssh, check
                          its health, roll back on failure (`cargo xtask deploy --help`)
  dist                    release archives with SHA-256 sums (`cargo xtask dist --help`)
  help                    print this text
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the context chain on one line, without a backtrace dump.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let Some((task, rest)) = args.split_first() else {
        print!("{HELP}");
        return Ok(());
    };
    match task.as_str() {
        "help" | "-h" | "--help" => {
            print!("{HELP}");
            Ok(())
        }
        "bench" => bench::run(rest),
        "lab" => lab::run(rest),
        "deploy" => deploy::run(rest),
        "dist" => dist::run(rest),
        // Hidden: child processes the benchmarks spawn so that they can be measured on their own.
        bench::forwarder::SUBCOMMAND => bench::forwarder::main(rest),
        bench::table::SUBCOMMAND => bench::table::main(rest),
        other => bail!("unknown task `{other}`; run `cargo xtask --help`"),
    }
}

/// The workspace root, so tasks behave the same from any working directory.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ sits directly inside the workspace root")
        .to_path_buf()
}

/// Where cargo puts build output: `CARGO_TARGET_DIR` when set, `<root>/target` otherwise.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => project_root().join(dir),
        None => project_root().join("target"),
    }
}
