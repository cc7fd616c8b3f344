//! Removing lab namespaces: one lab's on drop, and leftovers of labs whose process died without
//! dropping them (killed test runner, `kill -9`), which `netlab cleanup` and every process's first
//! lab remove.

use anyhow::{Context as _, Result};
use tracing::{debug, info};

use crate::netns::NAME_PREFIX;
use crate::sys;
use crate::tools;

/// The process id a lab namespace name was made by (`nl<pid>x<n>-<role>`), or `None` when the
/// name is not a lab's.
pub fn lab_owner(ns: &str) -> Option<u32> {
    let rest = ns.strip_prefix(NAME_PREFIX)?;
    let (pid, rest) = rest.split_once('x')?;
    let (n, role) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) || role.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Names of every lab namespace on this machine (any process's).
pub fn lab_namespaces() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir("/run/netns") {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("list /run/netns"),
    };
    let mut names = Vec::new();
    for entry in dir {
        let name = entry.context("list /run/netns")?.file_name();
        if let Some(name) = name.to_str() {
            if lab_owner(name).is_some() {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Removes lab namespaces left by processes that no longer run (`all = false`), or every lab
/// namespace but this process's own (`all = true`: also labs of running processes, such as a
/// `netlab up` in another terminal). Processes still inside them are killed. Returns the names
/// removed.
pub fn remove_stale(all: bool) -> Result<Vec<String>> {
    let me = std::process::id();
    let mut removed = Vec::new();
    for ns in lab_namespaces()? {
        let Some(owner) = lab_owner(&ns) else {
            continue;
        };
        if owner == me || (!all && sys::process_alive(owner)) {
            continue;
        }
        match remove_ns(&ns) {
            Ok(()) => {
                info!(%ns, "removed leftover lab namespace");
                removed.push(ns);
            }
            // Another process may be removing the same leftovers right now.
            Err(e) => debug!(%ns, error = %e, "could not remove leftover namespace"),
        }
    }
    Ok(removed)
}

/// Kills every process inside namespace `ns` (never this one) and deletes the namespace.
pub(crate) fn remove_ns(ns: &str) -> Result<()> {
    let t = tools::tools_or_err()?;
    let me = std::process::id();
    // Processes a test started in the namespace by other means than `Lab::spawn` would keep
    // the namespace alive after its name is gone.
    if let Ok(pids) = tools::run(&t.ip, &["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            if pid != me {
                // Each process in its own right: it may not lead a group of its own.
                sys::kill_pid(pid);
            }
        }
    }
    tools::run(&t.ip, &["netns", "del", ns])
        .map(drop)
        .with_context(|| format!("delete namespace {ns}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_lab_names_only() {
        assert_eq!(lab_owner("nl1234x0-pub"), Some(1234));
        assert_eq!(lab_owner("nl1x22-ra"), Some(1));
        assert_eq!(lab_owner("nl1234x0"), None);
        assert_eq!(lab_owner("nl1234x0-"), None);
        assert_eq!(lab_owner("nlabx0-pub"), None);
        assert_eq!(lab_owner("nlx0-pub"), None);
        assert_eq!(lab_owner("netns1"), None);
        assert_eq!(lab_owner("docker-123"), None);
    }
}
