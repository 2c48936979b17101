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
