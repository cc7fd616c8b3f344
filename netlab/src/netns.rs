//! Network namespace plumbing shared by the labs and their cleanup: namespace names, creating
//! and configuring namespaces, running threads and processes inside them, `ip`/sysctl helpers.
//! It depends on neither [`crate::lab`] nor [`crate::cleanup`], which both use it.

use std::os::fd::AsFd as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command};
use std::sync::Mutex;
use std::thread::JoinHandle;

use anyhow::{Context as _, Result};

use crate::sys;
use crate::tools::{run, run_with_input, Tools};

/// Start of every lab namespace name: `nl<pid>x<n>-<role>`. [`crate::cleanup`] matches it.
pub const NAME_PREFIX: &str = "nl";

/// Processes a lab spawned into its namespaces: each leads its own process group, which the
/// lab kills when it is dropped.
#[derive(Debug, Default)]
pub(crate) struct Children(Mutex<Vec<u32>>);

impl Children {
    /// Spawns `cmd` inside namespace `ns` (entered between fork and exec), as a process-group
    /// leader, and remembers it.
    pub(crate) fn spawn(&self, ns: &str, mut cmd: Command) -> Result<Child> {
        let fd = sys::open_netns(ns)?;
        sys::enter_netns_on_exec(&mut cmd, fd);
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {:?} in {ns}", cmd.get_program()))?;
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child.id());
        Ok(child)
    }

    /// Kills every process group spawned so far.
    pub(crate) fn kill_all(&mut self) {
        for pgid in std::mem::take(self.0.get_mut().unwrap_or_else(|p| p.into_inner())) {
            sys::kill_group(pgid);
        }
    }
}

/// The methods both labs ([`crate::Lab`], [`crate::MultipathLab`]) offer to run code in their
/// namespaces, over the lab's `children` field; expanded inside each lab's `impl`.
macro_rules! namespace_methods {
    () => {
        /// Runs `f` on a new thread inside namespace `ns` and returns its result.
        ///
        /// Sockets `f` creates (std, socket2, tokio) belong to `ns`, and so do threads it
        /// starts, including the workers of a tokio runtime built inside `f`. A panic in `f` is
        /// resumed here, so assertions inside `f` fail the test as usual.
        pub fn run_in<T, F>(&self, ns: &str, f: F) -> anyhow::Result<T>
        where
            F: FnOnce() -> T + Send,
            T: Send,
        {
            $crate::netns::run_in_netns(ns, f)
        }

        /// Starts `f` on a new thread inside namespace `ns`, for servers a test runs while it
        /// goes on (a relay, say). The caller owns the thread and must make `f` return (a stop
        /// flag, a closed socket) before the lab is dropped.
        pub fn spawn_thread<T, F>(
            &self,
            ns: &str,
            f: F,
        ) -> anyhow::Result<std::thread::JoinHandle<T>>
        where
            F: FnOnce() -> T + Send + 'static,
            T: Send + 'static,
        {
            $crate::netns::spawn_thread_in(ns, f)
        }

        /// Spawns `cmd` inside namespace `ns`, keeping everything set on it (arguments,
        /// environment, stdio, working directory). The child is killed (with its process
        /// group) when the lab is dropped, if it has not exited before.
        ///
        /// The child enters the namespace between fork and exec (like `ip netns exec`, without
        /// the `/sys` remount, which nothing here needs); it becomes a process-group leader.
        pub fn spawn(
            &self,
            ns: &str,
            cmd: std::process::Command,
        ) -> anyhow::Result<std::process::Child> {
            self.children.spawn(ns, cmd)
        }
    };
}
pub(crate) use namespace_methods;

/// Starts `f` on a new thread that has entered namespace `ns`.
pub(crate) fn spawn_thread_in<T, F>(ns: &str, f: F) -> Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let fd = sys::open_netns(ns)?;
    let ns_owned = ns.to_owned();
    std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            if let Err(e) = sys::setns_net(fd.as_fd()) {
                panic!("cannot enter namespace {ns_owned}: {e}");
            }
            drop(fd);
            f()
        })
        .context("spawn thread")
}

/// Creates namespace `name` (the caller records it for removal, then calls
/// [`configure_namespace`]).
pub(crate) fn create_namespace(t: &Tools, name: &str) -> Result<()> {
    run(&t.ip, &["netns", "add", name]).map(drop)
}

/// Turns IPv6 off and loopback up in a new namespace.
pub(crate) fn configure_namespace(t: &Tools, name: &str) -> Result<()> {
    configure_namespace_with(t, name, false)
}

/// [`configure_namespace`], with IPv6 on when `ipv6` (for labs that model it).
pub(crate) fn configure_namespace_with(t: &Tools, name: &str, ipv6: bool) -> Result<()> {
    // IPv6 off before any interface exists: no router solicitations or MLD reports, so the
    // lab carries only the IPv4 traffic tests send, all inside 198.18.0.0/15 and 100.64.0.0/10.
    // With IPv6 on, addresses are static (no router advertisements are accepted, no duplicate
    // address detection delays them) and all inside 2001:db8::/32.
    let v6 = if ipv6 { "0" } else { "1" };
    write_sysctls(
        name,
        &[
            ("net/ipv6/conf/all/disable_ipv6", v6),
            ("net/ipv6/conf/default/disable_ipv6", v6),
            ("net/ipv6/conf/all/accept_ra", "0"),
            ("net/ipv6/conf/default/accept_ra", "0"),
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
            ("net/ipv6/conf/default/router_solicitations", "0"),
        ],
    )?;
    ip(t, name, "link set lo up")
}

/// [`Lab::run_in`](crate::Lab::run_in) for any named namespace (one created with `ip netns add`).
pub fn run_in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let fd = sys::open_netns(ns)?;
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn_scoped(s, move || -> std::io::Result<T> {
                sys::setns_net(fd.as_fd())?;
                drop(fd);
                Ok(f())
            })
            .context("spawn thread")?;
        match handle.join() {
            Ok(r) => r.with_context(|| format!("entering namespace {ns}")),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// `ip -n NS ARGS`, with `args` split at spaces (lab names and addresses have none).
pub(crate) fn ip(t: &Tools, ns: &str, args: &str) -> Result<()> {
    let mut full = vec!["-n", ns];
    full.extend(args.split_ascii_whitespace());
    run(&t.ip, &full).map(drop)
}

/// `ip netns exec NS program args...`, for tools without a namespace option of their own.
pub(crate) fn netns_exec(
    t: &Tools,
    ns: &str,
    program: &std::path::Path,
    args: &[&str],
    input: Option<&str>,
) -> Result<String> {
    let program = program.to_str().context("tool path is not UTF-8")?;
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    run_with_input(&t.ip, &full, input)
}

/// Creates a TAP interface inside namespace `ns` (the device belongs to the namespace of the
/// thread that opens it).
pub(crate) fn open_tap_in(ns: &str, ifname: &str) -> Result<std::fs::File> {
    run_in_netns(ns, || sys::open_tap(ifname))?.with_context(|| format!("TAP {ifname} in {ns}"))
}

/// Writes `/proc/sys/<key>` as seen from inside namespace `ns` (the `net` sysctls are per
/// namespace, resolved for the thread that opens them). Missing keys (no IPv6 in this kernel)
/// are skipped.
pub(crate) fn write_sysctls(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    run_in_netns(ns, || -> Result<()> {
        for (key, value) in settings {
            let path = std::path::Path::new("/proc/sys").join(key);
            match std::fs::write(&path, value) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("write {}", path.display())),
            }
        }
        Ok(())
    })?
    .with_context(|| format!("sysctls in {ns}"))
}
