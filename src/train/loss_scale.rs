//! Dynamic loss scaling for fp16 compute (torch's `GradScaler`): the loss is multiplied before
//! backward so small activation gradients do not flush to zero in f16; the trainer divides the
//! gradients back (inside the optimiser step, with clipping); a step whose gradients overflowed is skipped and the scale halved, and after
//! `growth_interval` clean steps the scale doubles.

#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    pub clean_steps: usize,
    pub growth_interval: usize,
}

impl Default for LossScaler {
    /// torch.amp.GradScaler's defaults.
    fn default() -> Self {
        LossScaler { scale: 65536.0, clean_steps: 0, growth_interval: 2000 }
    }
}

impl LossScaler {
    /// Records whether the unscaled gradients were finite; returns whether to apply the step.
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale /= 2.0;
            self.clean_steps = 0;
            return false;
        }
        self.clean_steps += 1;
        if self.clean_steps == self.growth_interval {
            self.scale *= 2.0;
            self.clean_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_skips_and_halves_then_clean_steps_grow() {
        let mut s = LossScaler { growth_interval: 2, ..Default::default() };
        assert!(!s.update(false));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true) && s.update(true));
        assert_eq!(s.scale, 65536.0);
    }
}
