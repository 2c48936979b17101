//! Speed paths on trial. Each has an environment variable that turns it on (`=1`). Each stays off
//! by default until a GPU run has passed the GPU check with it on; the GPU runbook
//! (bench/gpu_session.sh) measures each one on and off in the same run (`bench generate
//! --compare`, `bench train --compare`), so whoever next has a GPU measures all of them at once.

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Sampling (generate, class and validation images) runs on UNet and VAE weights cast to the
    /// compute dtype once per batch of images, instead of casting every weight at every step
    /// (626 of the 3,470 kernels of a bf16 UNet step on the first GPU run were such casts).
    CastWeightsOnce,
    /// CUDA: the stream-ordered allocator's pool keeps the memory it frees (release threshold
    /// "everything") instead of handing it back to the driver at synchronisations, so the next
    /// step does not allocate from the driver again.
    KeepPoolMemory,
}

/// Per switch: 0 follows the environment, 1 forced off, 2 forced on.
static FORCED: [AtomicU8; 2] = [AtomicU8::new(0), AtomicU8::new(0)];

impl Switch {
    pub const ALL: [Switch; 2] = [Switch::CastWeightsOnce, Switch::KeepPoolMemory];

    /// The environment variable that turns it on.
    pub fn var(self) -> &'static str {
        match self {
            Switch::CastWeightsOnce => "DREAMBRIDGE_CAST_WEIGHTS_ONCE",
            Switch::KeepPoolMemory => "DREAMBRIDGE_CUDA_KEEP_POOL",
        }
    }

    fn slot(self) -> &'static AtomicU8 {
        &FORCED[self as usize]
    }

    pub fn on(self) -> bool {
        match self.slot().load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => std::env::var(self.var()).is_ok_and(|v| v == "1"),
        }
    }

    /// Whether [`Switch::force`] has set it (device-wide settings must then be set either way).
    pub fn forced(self) -> bool {
        self.slot().load(Ordering::Relaxed) != 0
    }

    /// Overrides the environment for the rest of this process (`bench --compare` alternates).
    pub fn force(self, on: bool) {
        self.slot().store(if on { 2 } else { 1 }, Ordering::Relaxed);
    }
}

/// Every switch's state, `VAR=0|1 ...`, for reports.
pub fn state() -> String {
    Switch::ALL.iter().map(|s| format!("{}={}", s.var(), s.on() as u8)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forcing_overrides_the_environment() {
        // The only test that touches KeepPoolMemory's slot (tests run in parallel).
        let s = Switch::KeepPoolMemory;
        s.force(true);
        assert!(s.on() && state().contains("DREAMBRIDGE_CUDA_KEEP_POOL=1"));
        s.force(false);
        assert!(!s.on() && state().contains("DREAMBRIDGE_CUDA_KEEP_POOL=0"));
    }
}
