//! glibc malloc settings for the proxy's binaries: freed stream buffers stay in the heap for
//! the next flow instead of going back to the kernel, where every reuse paid a page fault.

#![cfg(feature = "runtime")]

/// Allocations from this size up get their own mapping. glibc's default starts at 128 KiB and
/// moves with what was freed; fixed here (setting the trim threshold stops that movement)
/// above the proxy's largest recurring buffers, the 256 KiB TCP reads and 65,000-byte QUIC
/// packets, so those come from the heap and are reused.
pub const MMAP_THRESHOLD: usize = 1 << 20;

/// Free memory the heap keeps at its top instead of returning it. glibc's default (128 KiB,
/// raised to twice the largest freed mapping) handed back the buffers of a finished flow, and
/// the next flow faulted them in again page by page: a series of 64 MiB downloads through
/// client and server took 12,000-32,000 page faults per 10 downloads and ~5 % more CPU than
/// with this setting (3,700-5,400 faults, nearly all in the first download). 32 MiB is the
/// connection's send window, the most one bulk flow holds; that much memory may stay reserved
/// after a burst.
pub const TRIM_THRESHOLD: usize = 32 << 20;

/// Applies [`MMAP_THRESHOLD`] and [`TRIM_THRESHOLD`], unless the environment already sets
/// glibc's own variables (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`), which win.
/// Returns whether the settings were applied. Call it first thing in `main`, before threads
/// start; elsewhere than glibc it does nothing.
pub fn tune() -> bool {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some()
    {
        return false;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    let to_int = |v: usize| libc::c_int::try_from(v).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes allocator parameters; it returns 0 on a refused value.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, to_int(MMAP_THRESHOLD)) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, to_int(TRIM_THRESHOLD)) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}
