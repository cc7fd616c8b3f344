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
  bench relay [options]     measure quic-relay against baselines from the same run
  bench mqproxy [options]   mqproxy's UDP and TCP throughput against direct and shadowsocks
  bench uot [options]       udp-over-tcp against direct UDP: loss, highest rate, round trip
  bench multipath [options] root: mqproxy over two shaped paths against one, in the netns lab
  bench sdk [options]       peer-sdk: bulk QUIC through the relay against direct, connect times
  bench python [options]    the Python package against quic-portal: round trip p50/p99, bulk
                            (every bench takes --quick for a short smoke run)
  lab <up|check|matrix|cleanup>
                            the NAT lab in network namespaces (root); matrix: peer-sdk's
                            path for every pair of NAT types
  deploy --host USER@HOST   build, upload and restart quic-relay (or mqproxy) over ssh, check
                            its health, roll back on failure
  dist                      release archives (binaries, completions, man pages, deploy/) with
                            SHA-256 sums
  help, -h, --help          print this text and every task's options (below)
  -V, --version             print xtask's version
";

/// Every task's own help, printed after [`HELP`] so that `cargo xtask --help` lists every
/// command and flag in one place (each is also printed by `cargo xtask <task> --help`).
fn full_help() -> String {
    let sections: [(&str, &str); 10] = [
        ("bench", bench::HELP),
        ("bench relay", bench::relay::HELP),
        ("bench mqproxy", bench::mqproxy::HELP),
        ("bench uot", bench::uot::HELP),
        ("bench multipath", bench::multipath::HELP),
        ("bench sdk", bench::sdk::HELP),
        ("bench python", bench::python::HELP),
        ("lab", lab::HELP),
        ("deploy", deploy::HELP),
        ("dist", dist::HELP),
    ];
    let mut out = String::from(HELP);
    for (task, help) in sections {
        out.push_str(&format!("\n=== cargo xtask {task} ===\n{help}"));
    }
    out
}

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
        print!("{}", full_help());
        return Ok(());
    };
    match task.as_str() {
        "help" | "-h" | "--help" => {
            print!("{}", full_help());
            Ok(())
        }
        "-V" | "--version" => {
            println!("xtask {}", env!("CARGO_PKG_VERSION"));
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
