//! Worker threads that share one stop flag: the lab's probe servers and its shaped links each
//! run as such a group, and dropping the group stops and joins its threads.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tracing::warn;

use crate::sys;

/// How often an idle worker looks at its stop flag; bounds how long dropping a lab waits.
pub(crate) const STOP_POLL: Duration = Duration::from_millis(50);

/// Threads started by [`Workers::spawn`]; dropping this raises their stop flag and waits for
/// each, so their sockets and descriptors are closed when the owner is gone.
#[derive(Debug)]
pub(crate) struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// What the threads are, for errors and logs ("probe server thread").
    what: &'static str,
}

impl Workers {
    pub(crate) fn new(what: &'static str) -> Workers {
        Workers {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            what,
        }
    }

    /// Starts a thread called `name` running `f`, which returns soon after the flag it is
    /// given turns true.
    pub(crate) fn spawn<F>(&mut self, name: String, f: F) -> Result<()>
    where
        F: FnOnce(&AtomicBool) + Send + 'static,
    {
        let stop = self.stop.clone();
        let t = std::thread::Builder::new()
            .name(name)
            .spawn(move || f(&stop))
            .with_context(|| format!("spawn {}", self.what))?;
        self.threads.push(t);
        Ok(())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                warn!("a {} panicked", self.what);
            }
        }
    }
}

/// Waits until `fd` is readable: `true` then; `false` once `stop` is raised or the poll fails
/// (logged for the thread `what`), when the worker should end. A worker's loop is
/// `while readable_unless_stopped(…) { read … }`.
pub(crate) fn readable_unless_stopped(fd: BorrowedFd<'_>, stop: &AtomicBool, what: &str) -> bool {
    while !stop.load(Ordering::Relaxed) {
        match sys::wait_readable(fd, STOP_POLL) {
            Ok(true) => return true,
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, thread = what, "poll failed; the thread stops");
                return false;
            }
        }
    }
    false
}
