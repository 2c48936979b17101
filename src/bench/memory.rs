//! Peak memory of a benchmark phase. On the CPU: the process's peak resident set (VmHWM, reset
//! through /proc/self/clear_refs). On a GPU: the device's used memory (total − free, as the driver
//! reports it, so candle's and PyTorch's caching allocators are measured the same way), sampled
//! every millisecond by a background thread, minus what was in use when the phase started.

use anyhow::Result;
use candle_core::Device;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub struct PeakMemory {
    kind: Kind,
}

enum Kind {
    Cpu,
    #[allow(dead_code)] // built only with the `cuda` feature
    Gpu { baseline: u64, peak: Arc<AtomicU64>, stop: Arc<AtomicBool>, thread: Option<std::thread::JoinHandle<()>> },
}

impl PeakMemory {
    /// Starts measuring on `dev`.
    pub fn start(dev: &Device) -> Result<PeakMemory> {
        match dev {
            Device::Cpu => {
                // "5" resets the peak RSS counter; older kernels refuse, and the peak then covers the process.
                let _ = std::fs::write("/proc/self/clear_refs", "5");
                Ok(PeakMemory { kind: Kind::Cpu })
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                let ctx = cuda.cuda_stream().context().clone();
                let used = move || -> u64 { ctx.mem_get_info().map(|(free, total)| (total - free) as u64).unwrap_or(0) };
                let baseline = used();
                let peak = Arc::new(AtomicU64::new(baseline));
                let stop = Arc::new(AtomicBool::new(false));
                let (p, s) = (peak.clone(), stop.clone());
                let thread = std::thread::spawn(move || {
                    while !s.load(Ordering::Relaxed) {
                        p.fetch_max(used(), Ordering::Relaxed);
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                });
                Ok(PeakMemory { kind: Kind::Gpu { baseline, peak, stop, thread: Some(thread) } })
            }
            _ => anyhow::bail!("memory measurement: unsupported device {:?}", dev.location()),
        }
    }

    /// Stops and returns the peak in bytes.
    pub fn finish(mut self) -> Result<u64> {
        match &mut self.kind {
            Kind::Cpu => peak_rss(),
            Kind::Gpu { baseline, peak, stop, thread } => {
                stop.store(true, Ordering::Relaxed);
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
                Ok(peak.load(Ordering::Relaxed).saturating_sub(*baseline))
            }
        }
    }

    /// What is measured, for reports.
    pub fn label(dev: &Device) -> &'static str {
        if dev.is_cpu() {
            "peak RSS of the process"
        } else {
            "peak GPU memory in use (driver: total - free), above the phase's start"
        }
    }
}

fn peak_rss() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("/proc/self/status has no VmHWM"))?;
    Ok(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_peak_covers_a_large_allocation() {
        let m = PeakMemory::start(&Device::Cpu).unwrap();
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        drop(big);
        assert!(m.finish().unwrap() >= 64 << 20);
    }
}
