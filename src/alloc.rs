//! Allocator tuning for tensor work on the CPU. glibc serves every allocation above its mmap
//! threshold (at most 32 MB) with a fresh mapping and unmaps it on free, so each large tensor of a
//! training step costs page faults, zeroed pages and TLB shootdowns: perf showed a third of a CPU
//! SD 1.5 step in the kernel's `clear_page`. Serving them from the heap, and not trimming it, lets
//! freed tensor memory be reused directly (27 s -> 19 s per step, BENCHMARKS.md).

/// Makes large allocations come from (and return to) the malloc heap. No-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        if libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX) == 0 {
            libc::mallopt(libc::M_MMAP_MAX, 0);
        }
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
