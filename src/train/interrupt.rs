//! Stopping training cleanly. Spot and preemptible machines send SIGTERM, users press Ctrl-C: the
//! first signal asks the trainer to finish its current step, checkpoint and return
//! [`Interrupted`]; a second one exits the process at once (status 128 + signal), which loses no
//! finished checkpoint because checkpoints only ever appear by rename.

use anyhow::Result;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// A request to stop, shared with signal handlers: the signal number, 0 while none came.
#[derive(Clone, Debug, Default)]
pub struct StopRequest(Arc<AtomicUsize>);

impl StopRequest {
    /// A request that SIGINT and SIGTERM set. The handlers stay for the life of the process.
    pub fn on_signals() -> Result<StopRequest> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let request = StopRequest::default();
        let armed = Arc::new(AtomicBool::new(false));
        for signal in [SIGINT, SIGTERM] {
            // Order matters: the exit only fires when an earlier signal has already armed it.
            signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, Arc::clone(&armed))?;
            signal_hook::flag::register(signal, Arc::clone(&armed))?;
            signal_hook::flag::register_usize(signal, Arc::clone(&request.0), signal as usize)?;
        }
        Ok(request)
    }

    /// Asks for a stop as if `signal` had arrived.
    pub fn request(&self, signal: i32) {
        self.0.store(signal as usize, Ordering::SeqCst);
    }

    /// The signal that asked for a stop, if any did.
    pub fn signal(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }

    /// Fails with [`Interrupted`] (no checkpoint) once a stop was asked for: for the phases
    /// before the first training step.
    pub fn check(&self, step: usize) -> Result<()> {
        match self.signal() {
            Some(signal) => Err(Interrupted { signal, step, checkpoint: None }.into()),
            None => Ok(()),
        }
    }
}

/// Training stopped on a signal, after `step` steps, with the state saved in `checkpoint`.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub step: usize,
    pub checkpoint: Option<PathBuf>,
}

impl Interrupted {
    /// The shell's convention for a process ended by a signal.
    pub fn exit_code(&self) -> u8 {
        (128 + self.signal).clamp(1, 255) as u8
    }
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.signal {
            2 => "SIGINT".to_string(),
            15 => "SIGTERM".to_string(),
            s => format!("signal {s}"),
        };
        match &self.checkpoint {
            Some(c) => write!(f, "interrupted by {name} after step {}; saved {}", self.step, c.display()),
            None if self.step == 0 => write!(f, "interrupted by {name} before training started (class images made so far are kept)"),
            None => write!(f, "interrupted by {name} after step {}", self.step),
        }
    }
}

impl std::error::Error for Interrupted {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_seen_and_reported() {
        let stop = StopRequest::default();
        assert!(stop.check(0).is_ok() && stop.signal().is_none());
        let shared = stop.clone();
        shared.request(15);
        assert_eq!(stop.signal(), Some(15));
        let err = stop.check(0).unwrap_err();
        let i = err.downcast_ref::<Interrupted>().unwrap();
        assert_eq!(i.exit_code(), 143);
        assert!(err.to_string().contains("SIGTERM before training started"), "{err}");
    }
}
