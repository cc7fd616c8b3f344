//! Child processes that cannot outlive the task that started them.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A running child process, killed and reaped when dropped, on every exit path including `?`
/// and panics. The kernel also kills it if this process dies without unwinding (SIGKILL,
/// abort), so a benchmark never leaves a relay holding ports and a core.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    name: String,
    log: PathBuf,
}

impl ChildGuard {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, name: &str, log: &Path) -> Result<Self> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone().context("duplicate log file handle")?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
        // async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                // Tied to the spawning thread: every guard is created by the main thread,
                // which lives as long as the task.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {name}: {cmd:?}"))?;
        Ok(ChildGuard {
            child,
            name: name.to_owned(),
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the child's log has a line containing `needle` and returns the value of
    /// `key=` in that line (up to the next space, colour codes removed). How the benchmarks
    /// learn the address a child bound for port 0, instead of picking a port and releasing it.
    pub fn wait_logged(&mut self, needle: &str, key: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            // Whole lines only: a line read while it is being written would yield a cut value
            // (`127.0.0.` for an address), most often when another writer (valgrind) shares
            // the log.
            let whole = text.rfind('\n').map_or("", |end| &text[..end]);
            let found = whole
                .lines()
                .map(strip_ansi)
                .find(|l| l.contains(needle))
                .and_then(|l| {
                    l.split(&format!("{key}="))
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next())
                        // A Debug-logged `Option`: `Some(addr)`.
                        .map(|v| {
                            v.trim_start_matches("Some(")
                                .trim_end_matches(')')
                                .to_owned()
                        })
                });
            if let Some(v) = found {
                return Ok(v);
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                bail!(
                    "{} logged no {needle:?} line within {timeout:?}; last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    log_tail(&self.log, 10)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks the child to stop (SIGTERM) and waits up to `timeout` for it to exit, so that it
    /// can write what it writes on exit (a profiler's output); kills it after that.
    pub fn terminate(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = libc::pid_t::try_from(self.child.id()).context("child pid")?;
        // SAFETY: kill(2) on our own unreaped child: the pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("wait for child")? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not exit within {timeout:?} of SIGTERM; see {}",
                    self.name,
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails (with the end of its log) if the child has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("wait for child")? {
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 20)
            );
        }
        Ok(())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Errors only mean it is already gone; wait() reaps it so no zombie is left.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a log file, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A CPU set holding only `cpu`, for `sched_setaffinity`.
fn cpu_set(cpu: usize) -> std::io::Result<libc::cpu_set_t> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::other(format!("CPU {cpu} out of range")));
    }
    // SAFETY: cpu_set_t is plain old data (all-zero is the empty set), and `cpu` was checked to
    // be below CPU_SETSIZE, the bound CPU_SET indexes within.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        Ok(set)
    }
}

/// Restricts the process `cmd` starts, and every thread it creates, to CPU `cpu`.
pub fn pin_command(cmd: &mut Command, cpu: usize) -> std::io::Result<()> {
    let set = cpu_set(cpu)?;
    // SAFETY: the closure runs between fork and exec and only calls sched_setaffinity(2), a
    // plain system call, on a set built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Restricts the calling thread, and the threads it starts from now on, to CPU `cpu`.
pub fn pin_this_thread(cpu: usize) -> std::io::Result<()> {
    let set = cpu_set(cpu)?;
    // SAFETY: a valid set of the stated size; pid 0 means the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Puts the calling thread's CPU affinity back as it was when dropped.
#[derive(Debug)]
pub struct AffinityGuard {
    saved: libc::cpu_set_t,
}

impl Drop for AffinityGuard {
    fn drop(&mut self) {
        // SAFETY: a set the kernel filled in, of the stated size; pid 0 is the calling thread.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.saved) };
    }
}

/// Like [`pin_this_thread`], until the returned guard is dropped (threads started meanwhile
/// keep the pin).
pub fn pin_this_thread_for_now(cpu: usize) -> std::io::Result<AffinityGuard> {
    // SAFETY: cpu_set_t is plain old data; the kernel fills it in.
    let mut saved: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: a writable set of the stated size; pid 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut saved) }
        != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    pin_this_thread(cpu)?;
    Ok(AffinityGuard { saved })
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
