//! The external tools the lab drives (`ip`, `nft`, `conntrack`), found once, run with errors
//! that say which command failed and what it printed; and the precondition check tests start with.

use std::ffi::OsStr;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context as _, Result};
use tracing::debug;

/// The tools, by package: `ip` (iproute2), `nft` (nftables), `conntrack` (conntrack).
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    pub(crate) ip: PathBuf,
    pub(crate) nft: PathBuf,
    pub(crate) conntrack: PathBuf,
}

/// Debian packages that provide what the lab runs; CI installs exactly these.
pub const DEBIAN_PACKAGES: &[&str] = &["iproute2", "nftables", "conntrack"];

/// Looks a program up in `PATH` and then in the sbin directories, which are not always on a
/// test runner's `PATH` even when it runs as root.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds the tools once per process; `Err` names the missing ones and their packages.
pub(crate) fn tools() -> Result<&'static Tools, String> {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    TOOLS
        .get_or_init(|| {
            let wanted = [
                ("ip", "iproute2"),
                ("nft", "nftables"),
                ("conntrack", "conntrack"),
            ];
            let found: Vec<_> = wanted.iter().map(|(n, _)| find_program(n)).collect();
            let missing: Vec<String> = wanted
                .iter()
                .zip(&found)
                .filter(|(_, f)| f.is_none())
                .map(|((n, pkg), _)| format!("`{n}` (Debian package {pkg})"))
                .collect();
            match found.as_slice() {
                [Some(ip), Some(nft), Some(conntrack)] => Ok(Tools {
                    ip: ip.clone(),
                    nft: nft.clone(),
                    conntrack: conntrack.clone(),
                }),
                _ => Err(format!("missing {}", missing.join(", "))),
            }
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Like [`tools`], as an `anyhow` error for code that already decided the lab can run.
pub(crate) fn tools_or_err() -> Result<&'static Tools> {
    tools().map_err(|e| anyhow::anyhow!("netlab cannot run: {e}"))
}

/// Runs a command to completion; on failure the error carries the command line and its stderr.
pub(crate) fn run(program: &Path, args: &[&str]) -> Result<String> {
    run_with_input(program, args, None)
}

/// Like [`run`], feeding `input` on standard input (how rulesets go to `nft -f -`).
pub(crate) fn run_with_input(program: &Path, args: &[&str], input: Option<&str>) -> Result<String> {
    let line = CommandLine(program, args);
    debug!(command = %line, "run");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().context("child stdin was piped")?;
        stdin
            .write_all(input.as_bytes())
            .with_context(|| format!("cannot write the input of `{line}`"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("cannot wait for `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Displays a command line for errors and logs.
struct CommandLine<'a>(&'a Path, &'a [&'a str]);

impl fmt::Display for CommandLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.0.file_name().unwrap_or(OsStr::new("?"));
        write!(f, "{}", name.to_string_lossy())?;
        for arg in self.1 {
            write!(f, " {arg}")?;
        }
        Ok(())
    }
}

/// Why the lab cannot run on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkipReason(pub String);

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// True when the environment says this is CI (`CI=true` or `CI=1`), where a lab test must never
/// be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Checks what the lab needs without changing anything: root, the tools, `/dev/net/tun`
/// (link shaping) and network namespaces support.
pub fn lab_unavailable() -> Option<SkipReason> {
    if crate::sys::effective_uid() != 0 {
        return Some(SkipReason(
            "netlab needs root (network namespaces, nftables)".into(),
        ));
    }
    if let Err(e) = tools() {
        return Some(SkipReason(format!(
            "netlab needs {e}; install: apt-get install {}",
            DEBIAN_PACKAGES.join(" ")
        )));
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some(SkipReason(
            "netlab needs /dev/net/tun (link shaping runs through TAP devices)".into(),
        ));
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Some(SkipReason("this kernel has no network namespaces".into()));
    }
    None
}

/// True when the test binary was asked to run ignored tests (`--ignored` or
/// `--include-ignored`): lab tests are `#[ignore]`d with their prerequisites as the reason, so
/// a run that asks for them must not pass them without running them.
pub fn ignored_tests_requested() -> bool {
    std::env::args().any(|a| a == "--ignored" || a == "--include-ignored")
}

/// The check a lab test starts with: `None` when the lab can run; `Some(reason)` when the test
/// should skip, which it may only outside CI and when ignored tests were not asked for.
///
/// # Panics
/// When the lab cannot run and `CI` is set (`true` or `1`), or ignored tests were asked for:
/// then the test must run, not pass without running.
pub fn require_lab() -> Option<SkipReason> {
    let reason = lab_unavailable()?;
    if in_ci() || ignored_tests_requested() {
        panic!(
            "the NAT lab cannot run: {reason}. Under CI=true or with --ignored these tests must \
             run, not skip (run as root and install: {})",
            DEBIAN_PACKAGES.join(" ")
        );
    }
    Some(reason)
}

/// Returns from the calling test (with the given value, `()` by default) after printing
/// `skipping: <why>` when the lab cannot run here; panics instead under CI.
///
/// ```no_run
/// #[test]
/// fn my_lab_test() {
///     netlab::require_lab!();
///     // ... build a netlab::Lab ...
/// }
///
/// #[test]
/// fn my_fallible_lab_test() -> anyhow::Result<()> {
///     netlab::require_lab!(Ok(()));
///     Ok(())
/// }
/// ```
#[macro_export]
macro_rules! require_lab {
    () => {
        $crate::require_lab!(())
    };
    ($ret:expr) => {
        if let Some(reason) = $crate::require_lab() {
            eprintln!("skipping: {reason}");
            return $ret;
        }
    };
}
