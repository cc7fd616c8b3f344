//! A multipath lab: a client namespace with two (or more) interfaces, each over its own shaped
//! link to a server namespace, with source-based routing so a socket bound to a path's local
//! address leaves through that path's link. Paths can be cut and healed one at a time.
//!
//! ```text
//!  client ns                                         server ns
//!  p0 198.18.10.2/24 ==== shaped link 0 ==== s0 198.18.10.1/24
//!  p1 198.18.11.2/24 ==== shaped link 1 ==== s1 198.18.11.1/24
//!  rule: from 198.18.1N.2 -> table 10+N              lo 198.18.0.1/32 (the service address)
//!  (default via path 0)
//! ```
//!
//! Everything is inside 198.18.0.0/15; the namespaces have no link to the host's network.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use tracing::{debug, warn};

use crate::lab::new_prefix;
use crate::netns::{
    configure_namespace, create_namespace, ip, open_tap_in, run_in_netns, write_sysctls, Children,
};
use crate::wire::{LinkShape, Wire};
use crate::{cleanup, tools};

/// Most paths a multipath lab builds.
pub const MAX_LAB_PATHS: usize = 8;

/// The server's service address (on its loopback, reachable over every path).
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// A running multipath lab; dropping it kills its processes, stops its links and deletes its
/// namespaces.
#[derive(Debug)]
pub struct MultipathLab {
    prefix: String,
    paths: usize,
    shape: LinkShape,
    namespaces: Vec<String>,
    children: Children,
    wires: Vec<Wire>,
}

impl MultipathLab {
    /// Builds a lab with `paths` paths (1 to [`MAX_LAB_PATHS`]), each shaped by `shape`.
    pub fn new(paths: usize, shape: LinkShape) -> Result<MultipathLab> {
        if let Some(reason) = tools::lab_unavailable() {
            anyhow::bail!("netlab cannot run here: {reason}");
        }
        anyhow::ensure!(
            (1..=MAX_LAB_PATHS).contains(&paths),
            "a multipath lab has 1 to {MAX_LAB_PATHS} paths, not {paths}"
        );
        let mut lab = MultipathLab {
            prefix: new_prefix(),
            paths,
            shape,
            namespaces: Vec::new(),
            children: Children::default(),
            wires: Vec::new(),
        };
        lab.build()
            .with_context(|| format!("building multipath lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let t = tools::tools_or_err()?;
        let (client, server) = (self.client_ns(), self.server_ns());
        for ns in [&client, &server] {
            create_namespace(t, ns)?;
            self.namespaces.push(ns.clone());
            configure_namespace(t, ns)?;
            // Replies to a path's address must be accepted on that path's interface even when
            // the main table would route elsewhere.
            write_sysctls(
                ns,
                &[
                    ("net/ipv4/conf/all/rp_filter", "0"),
                    ("net/ipv4/conf/default/rp_filter", "0"),
                ],
            )?;
        }
        ip(t, &server, &format!("addr add {SERVER_IP}/32 dev lo"))?;
        for i in 0..self.paths {
            let (cif, sif) = (format!("p{i}"), format!("s{i}"));
            let ctap = open_tap_in(&client, &cif)?;
            let stap = open_tap_in(&server, &sif)?;
            let name = format!("{}-path{i}", self.prefix);
            self.wires.push(Wire::start(ctap, stap, self.shape, &name)?);
            let (cip, sip) = (self.client_ip(i), self.server_link_ip(i));
            ip(t, &client, &format!("addr add {cip}/24 dev {cif}"))?;
            ip(t, &client, &format!("link set {cif} up"))?;
            ip(t, &server, &format!("addr add {sip}/24 dev {sif}"))?;
            ip(t, &server, &format!("link set {sif} up"))?;
            let table = 10 + i;
            ip(
                t,
                &client,
                &format!("route add default via {sip} dev {cif} table {table}"),
            )?;
            ip(t, &client, &format!("rule add from {cip} table {table}"))?;
            if i == 0 {
                ip(
                    t,
                    &client,
                    &format!("route add default via {sip} dev {cif}"),
                )?;
            }
        }
        debug!(prefix = %self.prefix, paths = self.paths, shape = ?self.shape, "multipath lab up");
        Ok(())
    }

    /// The client's namespace.
    pub fn client_ns(&self) -> String {
        format!("{}-mpc", self.prefix)
    }

    /// The server's namespace.
    pub fn server_ns(&self) -> String {
        format!("{}-mps", self.prefix)
    }

    /// Number of paths.
    pub fn paths(&self) -> usize {
        self.paths
    }

    /// The shape of every path's link.
    pub fn shape(&self) -> LinkShape {
        self.shape
    }

    /// The client's address on path `i` (bind a socket to it to use that path).
    pub fn client_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 10 + i as u8, 2)
    }

    /// The server's end of path `i`.
    pub fn server_link_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 10 + i as u8, 1)
    }

    /// The server's service address, reachable over every path ([`SERVER_IP`]).
    pub fn server_ip(&self) -> Ipv4Addr {
        SERVER_IP
    }

    /// The client-side interface of path `i` (`p<i>`), for byte counters.
    pub fn client_if(&self, i: usize) -> String {
        format!("p{i}")
    }

    /// Cuts path `i` (`up = false`: its link drops every frame, as a pulled cable) or heals it.
    pub fn set_path(&self, i: usize, up: bool) -> Result<()> {
        anyhow::ensure!(i < self.paths, "no path {i}");
        let t = tools::tools_or_err()?;
        let state = if up { "up" } else { "down" };
        ip(t, &self.server_ns(), &format!("link set s{i} {state}"))
    }

    /// Bytes received and sent by the client's interface of path `i` (the kernel's counters).
    pub fn client_if_bytes(&self, i: usize) -> Result<(u64, u64)> {
        let dev = self.client_if(i);
        run_in_netns(&self.client_ns(), move || -> Result<(u64, u64)> {
            // thread-self: /proc/net follows the process's first thread, which is not in the lab.
            let stats = std::fs::read_to_string("/proc/thread-self/net/dev")
                .context("read /proc/thread-self/net/dev")?;
            for line in stats.lines() {
                let Some((name, rest)) = line.split_once(':') else {
                    continue;
                };
                if name.trim() == dev {
                    let f: Vec<u64> = rest
                        .split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    anyhow::ensure!(f.len() >= 9, "short /proc/net/dev line for {dev}");
                    return Ok((f[0], f[8]));
                }
            }
            anyhow::bail!("no interface {dev}")
        })?
    }

    crate::netns::namespace_methods!();
}

impl Drop for MultipathLab {
    fn drop(&mut self) {
        self.children.kill_all();
        self.wires.clear();
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = cleanup::remove_ns(&ns) {
                warn!(%ns, error = %e, "could not remove lab namespace");
            }
        }
    }
}
