//! Where a conversion's time goes: wall time summed per phase (reading tensors, changing their
//! layout, casting, writing, syncing to disk), printed at the end when `DREAMBRIDGE_PROFILE` is
//! set. Phases run on several threads at once can add up to more than the wall time. Inputs
//! read from a memory map are read during the permute (their pages fault in there), so `read`
//! shows only what goes through a library's own reads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[derive(Clone, Copy, Debug)]
pub enum Phase {
    Read,
    Permute,
    Cast,
    Write,
    Sync,
}

const NAMES: [&str; 5] = ["read", "permute", "cast", "write", "sync"];
static NANOS: [AtomicU64; 5] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
static BYTES: [AtomicU64; 5] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// Runs `f`, counting its wall time (and `bytes`) to `phase`.
pub fn time<T>(phase: Phase, bytes: usize, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    NANOS[phase as usize].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    BYTES[phase as usize].fetch_add(bytes as u64, Ordering::Relaxed);
    out
}

/// Whether `DREAMBRIDGE_PROFILE` asks for the report.
pub fn enabled() -> bool {
    std::env::var_os("DREAMBRIDGE_PROFILE").is_some_and(|v| !v.is_empty() && v != "0")
}

/// One line per phase that ran: seconds and MB/s.
pub fn report() -> String {
    let mut out = String::from("profile:");
    for (i, name) in NAMES.iter().enumerate() {
        let (ns, bytes) = (NANOS[i].load(Ordering::Relaxed), BYTES[i].load(Ordering::Relaxed));
        if ns > 0 {
            let s = ns as f64 / 1e9;
            out += &format!(" {name} {s:.2} s ({:.0} MB/s);", bytes as f64 / 1e6 / s);
        }
    }
    out
}
