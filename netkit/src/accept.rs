//! The error path every accept loop needs: a failed `accept` (out of file descriptors and the
//! like) is logged and followed by a pause, so that the loop does not spin on it.

use std::io;
use std::time::Duration;

use tracing::warn;

/// The accepted connection, or `None` after logging the error and pausing for `pause`: the
/// loop then goes round again (`let Some((stream, peer)) = … else { continue }`).
pub async fn or_pause<T>(accepted: io::Result<T>, pause: Duration) -> Option<T> {
    match accepted {
        Ok(conn) => Some(conn),
        Err(e) => {
            warn!(error = %e, "accept failed");
            tokio::time::sleep(pause).await;
            None
        }
    }
}
