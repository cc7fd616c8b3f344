//! Multipath at runtime, shared by client and server: the path table of one bundle (one QUIC
//! connection per path, each watched by a health monitor), per-packet UDP scheduling over it,
//! and striped TCP flows (one flow's bytes spread over subflow streams on every path, put back
//! in order at the other end, chunks of a dead path resent on a live one). The decisions are
//! made by the pure parts in [`sched`].
//!
//! - [`sched`]: the scheduler, reorder and send buffers, duplicate filter; pure.
//! - [`table`]: the path table and its health monitors (runtime).
//! - [`flow`]: striped TCP flows over the table (runtime).

pub mod sched;

#[cfg(feature = "runtime")]
pub mod flow;
#[cfg(feature = "runtime")]
pub mod table;

#[cfg(feature = "runtime")]
pub use flow::{run_flow, unwritten_bytes, FlowError, Subflow};
#[cfg(feature = "runtime")]
pub use table::{PathConn, PathReport, PathTable};
