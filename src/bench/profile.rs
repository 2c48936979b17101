//! One region for Nsight Compute: with `DREAMBRIDGE_PROFILE_RANGE=NAME` set, the
//! `DREAMBRIDGE_PROFILE_AT`-th occurrence (default the 1st) of the region NAME (`unet_step`: one
//! UNet call of sampling; `train_step`: one optimizer step of `bench train`) runs between
//! `cuProfilerStart` and `cuProfilerStop`, so `ncu --profile-from-start off` times exactly its
//! kernels. Without the variable, or on the CPU, a region costs a comparison.

use candle_core::Device;
use std::collections::HashMap;
use std::sync::Mutex;

static SEEN: Mutex<Option<HashMap<&'static str, usize>>> = Mutex::new(None);

/// The open region; the profiler stops when it is dropped (after the device has finished).
pub struct Region {
    device: Option<Device>,
    /// `DREAMBRIDGE_REGION_WALL=1`: every occurrence's wall time, device work included, printed
    /// on stderr as `region NAME #K wall MS ms` (for the kernel-time share of the same region).
    wall: Option<(&'static str, usize, Device, std::time::Instant)>,
}

/// `DREAMBRIDGE_PROFILE_RANGE`, read once: regions sit on the hot path (every UNet call).
fn profiled_range() -> Option<&'static str> {
    static RANGE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    RANGE.get_or_init(|| std::env::var("DREAMBRIDGE_PROFILE_RANGE").ok()).as_deref()
}

/// Enters one occurrence of region `name` on `dev`.
pub fn region(name: &'static str, dev: &Device) -> Region {
    let off = Region { device: None, wall: None };
    if dev.is_cpu() || profiled_range() != Some(name) {
        return off;
    }
    let at: usize = std::env::var("DREAMBRIDGE_PROFILE_AT").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let mut seen = SEEN.lock().unwrap();
    let count = seen.get_or_insert_with(HashMap::new).entry(name).or_insert(0);
    *count += 1;
    if std::env::var("DREAMBRIDGE_REGION_WALL").is_ok_and(|v| v == "1") {
        let _ = dev.synchronize();
        return Region { device: None, wall: Some((name, *count, dev.clone(), std::time::Instant::now())) };
    }
    if *count != at {
        return off;
    }
    // Work queued before the region must not land in it.
    let _ = dev.synchronize();
    let started = crate::device::profiler(true);
    eprintln!("profile region {name} #{at}: {}", if started { "profiler started" } else { "the driver has no profiler entry points" });
    Region { device: started.then(|| dev.clone()), wall: None }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let Some(dev) = &self.device {
            let _ = dev.synchronize();
            crate::device::profiler(false);
        }
        if let Some((name, k, dev, start)) = &self.wall {
            let _ = dev.synchronize();
            eprintln!("region {name} #{k} wall {:.3} ms", start.elapsed().as_secs_f64() * 1e3);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn regions_on_the_cpu_do_nothing() {
        let r = super::region("unet_step", &candle_core::Device::Cpu);
        assert!(r.device.is_none() && r.wall.is_none());
    }
}
