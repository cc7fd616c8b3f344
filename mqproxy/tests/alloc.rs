//! `mqproxy::alloc`: stream buffers freed by one flow are reused by the next without faulting
//! their pages in again. Its own test binary, so no other test's allocations share the heap.

#![cfg(all(target_os = "linux", target_env = "gnu", feature = "runtime"))]

/// Minor page faults this thread has taken so far.
fn minor_faults() -> libc::c_long {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, u.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    // SAFETY: initialised by the successful call above.
    unsafe { u.assume_init() }.ru_minflt
}

/// What one bulk flow leaves behind: 64 of the proxy's largest TCP read buffers (256 KiB),
/// written once; returns the page faults that took.
fn one_flow_of_buffers() -> libc::c_long {
    let before = minor_faults();
    let bufs: Vec<Vec<u8>> = (0..64).map(|_| vec![0x5a; 256 << 10]).collect();
    let faults = minor_faults() - before;
    drop(bufs);
    faults
}

#[test]
fn the_next_flow_reuses_the_freed_buffers_without_page_faults() {
    assert!(
        mqproxy::alloc::tune(),
        "the settings were not applied (MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ set?)"
    );
    let first = one_flow_of_buffers();
    let second = one_flow_of_buffers();
    // 64 × 256 KiB is 4,096 pages: fresh memory faults on first write, which shows the count
    // sees faults at all. With glibc's defaults the second flow faults as much again (the
    // buffers were unmapped or trimmed when freed).
    assert!(
        first >= 2_048,
        "the first flow took only {first} page faults"
    );
    assert!(
        second < 256,
        "the second flow took {second} page faults (the first {first}): freed buffers went back \
         to the kernel"
    );
}
