//! The `netlab` binary (used by `cargo xtask lab`): bring a NAT lab up for manual work, run the
//! NAT self-checks, or remove leftovers of labs whose process died.

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use netlab::{Lab, LabConfig, LinkShape, NatType, Side, Stack};

/// A NAT lab: two peers behind real Linux NATs (network namespaces + nftables) and a relay host
/// on a private "internet" (198.18.0.0/15). Needs root.
#[derive(Debug, Parser)]
#[command(name = "netlab", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build a lab, print its namespaces and addresses, and keep it until Ctrl-C (or SIGTERM).
    Up {
        /// NAT in front of peer A: none, full-cone, port-restricted, symmetric, udp-blocked.
        #[arg(long, default_value = "port-restricted")]
        a: NatType,
        /// NAT in front of peer B (same choices).
        #[arg(long, default_value = "port-restricted")]
        b: NatType,
        /// One-way delay on each peer's public link, both directions, in milliseconds.
        #[arg(long)]
        delay_ms: Option<u32>,
        /// Random loss on each peer's public link, per direction, in percent.
        #[arg(long)]
        loss_pct: Option<f64>,
        /// Bandwidth of each peer's public link, per direction, in Mbit/s.
        #[arg(long)]
        rate_mbit: Option<f64>,
        /// Skip measuring both peers' NAT behaviour after the lab is up.
        #[arg(long)]
        no_check: bool,
    },
    /// Build labs per NAT type and check each behaves as named (mapping, filtering, TCP), and
    /// that IPv4-only, dual-stack and IPv6-only peers have the families and IPv6 firewall they
    /// should.
    Check {
        /// Only these types (repeatable); default all.
        #[arg(long = "nat")]
        nats: Vec<NatType>,
    },
    /// Remove namespaces of labs whose process is gone.
    Cleanup {
        /// Also remove labs of processes that still run (a `netlab up` elsewhere, running tests).
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    // Before any thread exists, so every thread inherits the mask and Ctrl-C reaches only
    // `wait_for_termination`: the lab is always dropped and its namespaces removed.
    if let Err(e) = netlab::block_termination_signals() {
        eprintln!("error: cannot block SIGINT/SIGTERM: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    netkit::logging::init("info");
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let Cmd::Cleanup { all } = cli.command {
        let removed = netlab::cleanup::remove_stale(all)?;
        println!("removed {} namespace(s)", removed.len());
        for ns in removed {
            println!("  {ns}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(reason) = netlab::lab_unavailable() {
        anyhow::bail!("the lab cannot run here: {reason}");
    }
    match cli.command {
        Cmd::Up {
            a,
            b,
            delay_ms,
            loss_pct,
            rate_mbit,
            no_check,
        } => {
            let shape =
                (delay_ms.is_some() || loss_pct.is_some() || rate_mbit.is_some()).then(|| {
                    LinkShape {
                        delay_ms: delay_ms.unwrap_or(0),
                        loss_pct: loss_pct.unwrap_or(0.0),
                        rate_mbit,
                    }
                });
            up(
                LabConfig {
                    shape,
                    ..LabConfig::new(a, b)
                },
                !no_check,
            )
        }
        Cmd::Check { nats } => check(if nats.is_empty() {
            NatType::ALL.to_vec()
        } else {
            nats
        }),
        Cmd::Cleanup { .. } => unreachable!("handled above"),
    }
}

fn up(config: LabConfig, self_check: bool) -> Result<ExitCode> {
    let lab = Lab::new(config)?;
    println!("lab {} is up", lab.prefix());
    if let Some(shape) = config.shape {
        println!("peer links shaped (each direction): {shape:?}");
    }
    println!(
        "  public transit   ns {:<16} router: 198.18.N.254/24 towards site N (relay 0, A 1, B 2)",
        lab.public_ns()
    );
    println!(
        "  relay host       ns {:<16} {} and {} (probe servers on udp/{p}, udp/{}, tcp/{p})",
        lab.relay_ns(),
        lab.relay_ip(),
        lab.relay_ip2(),
        netlab::PROBE_ALT_PORT,
        p = netlab::PROBE_PORT,
    );
    for side in Side::BOTH {
        match (
            lab.router_ns(side),
            lab.router_wan_ip(side),
            lab.router_lan_ip(side),
        ) {
            (Some(r), Some(wan), Some(lan)) => {
                println!(
                    "  router {side}         ns {r:<16} {} NAT, wan {wan}, lan {lan}",
                    lab.nat(side)
                );
            }
            _ => println!("  router {side}         (none: peer {side} is on the public segment)"),
        }
        println!(
            "  peer {side}           ns {:<16} {}",
            lab.peer_ns(side),
            lab.peer_ip(side)
        );
    }
    println!(
        "run a command in a namespace: ip netns exec {} <command>",
        lab.peer_ns(Side::A)
    );
    if self_check {
        for side in Side::BOTH {
            match lab.nat_report(side) {
                Ok(report) => {
                    let verdict = match report.verify() {
                        Ok(()) => "as named".to_owned(),
                        Err(e) => format!("NOT as named: {e}"),
                    };
                    println!("{report} [{verdict}]");
                }
                Err(e) => println!("peer {side}: measurement failed: {e:#}"),
            }
        }
    }
    println!("Ctrl-C to remove the lab");
    let signal = netlab::wait_for_termination().context("waiting for Ctrl-C")?;
    println!("signal {signal}: removing lab {}", lab.prefix());
    drop(lab);
    Ok(ExitCode::SUCCESS)
}

fn check(nats: Vec<NatType>) -> Result<ExitCode> {
    // Two labs per type, all at once (each check spends most of its time waiting for probe
    // timeouts, not CPU): IPv4-only peers for the NAT behaviour, and a dual-stack peer A with an
    // IPv6-only peer B for the IP families and the router's IPv6 firewall.
    let results: Vec<(NatType, Result<Vec<Report>>)> = std::thread::scope(|s| {
        let handles: Vec<_> = nats
            .iter()
            .map(|&nat| {
                s.spawn(move || -> Result<Vec<Report>> {
                    let mut reports = Vec::new();
                    let lab = Lab::new(LabConfig::new(nat, nat))?;
                    for side in Side::BOTH {
                        reports.push(Report::Nat(lab.nat_report(side)?));
                        reports.push(Report::Stack(lab.stack_report(side)?));
                    }
                    drop(lab);
                    let lab =
                        Lab::new(LabConfig::new(nat, nat).with_stacks(Stack::Dual, Stack::V6))?;
                    for side in Side::BOTH {
                        reports.push(Report::Stack(lab.stack_report(side)?));
                    }
                    Ok(reports)
                })
            })
            .collect();
        nats.iter()
            .zip(handles)
            .map(|(&nat, h)| {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("check thread panicked")));
                (nat, r)
            })
            .collect()
    });
    let mut failed = 0;
    for (nat, result) in results {
        match result {
            Err(e) => {
                failed += 1;
                println!("FAIL {nat}: {e:#}");
            }
            Ok(reports) => {
                for report in reports {
                    let verdict = match &report {
                        Report::Nat(r) => r.verify(),
                        Report::Stack(r) => r.verify(),
                    };
                    match verdict {
                        Ok(()) => println!("ok   {report}"),
                        Err(e) => {
                            failed += 1;
                            println!("FAIL {e:#}");
                        }
                    }
                }
            }
        }
    }
    println!(
        "{} failed",
        if failed == 0 {
            "none".to_owned()
        } else {
            failed.to_string()
        }
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One line of `netlab check`.
enum Report {
    Nat(netlab::NatReport),
    Stack(netlab::StackReport),
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Report::Nat(r) => r.fmt(f),
            Report::Stack(r) => r.fmt(f),
        }
    }
}
