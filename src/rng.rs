//! A seeded random source whose whole state is one number, so a checkpoint can restore it and a
//! resumed run draws exactly the noise and timesteps the uninterrupted run would have.

use candle_core::{Device, Result, Tensor};

#[derive(Clone, Debug, PartialEq)]
pub struct TrainRng {
    pub state: u64,
}

impl TrainRng {
    pub fn new(seed: u64) -> TrainRng {
        TrainRng { state: seed ^ 0x9E37_79B9_7F4A_7C15 }
    }

    /// An independent stream for one draw made outside the training loop (`purpose`, item
    /// `index`): what it yields depends only on these and the seed, never on what else this
    /// process drew before.
    pub fn stream(seed: u64, purpose: &str, index: u64) -> TrainRng {
        // FNV-1a of the purpose, then each part folded in through the splitmix64 output function.
        let label = purpose.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3));
        let mut mix = TrainRng::new(seed);
        for part in [label, index] {
            mix.state ^= part;
            mix.state = mix.next_u64();
        }
        TrainRng { state: mix.state }
    }

    /// splitmix64.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// Standard normal samples (Box-Muller) as a tensor of `shape`.
    pub fn normal(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let count: usize = shape.iter().product();
        let mut v = Vec::with_capacity(count + 1);
        while v.len() < count {
            let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
            let r = (-2.0 * u1.ln()).sqrt();
            v.push((r * (2.0 * std::f64::consts::PI * u2).cos()) as f32);
            v.push((r * (2.0 * std::f64::consts::PI * u2).sin()) as f32);
        }
        v.truncate(count);
        Tensor::from_vec(v, shape, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_depend_only_on_seed_purpose_and_index() {
        let first = |seed, purpose, index| TrainRng::stream(seed, purpose, index).next_u64();
        assert_eq!(first(3, "class image", 5), first(3, "class image", 5));
        let distinct = [first(3, "class image", 5), first(3, "class image", 6), first(3, "class augmentation", 5), first(4, "class image", 5), TrainRng::new(3).next_u64()];
        for (i, a) in distinct.iter().enumerate() {
            for b in &distinct[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
