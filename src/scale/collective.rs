//! Collectives behind one small interface, for data-parallel training: each rank sums its
//! gradients with every other rank's once per optimiser step. Backends: [`WorldOfOne`] (a single
//! process: nothing to exchange) and [`InProcess`] (ranks as threads of one process, for tests
//! and for proving the data-parallel arithmetic on the CPU); across processes, [`super::tcp`]
//! (CPU, like torch's gloo) and `super::nccl` (GPUs, the `nccl` cargo feature).

use anyhow::Result;
use candle_core::Tensor;
use std::sync::{Arc, Condvar, Mutex};

pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replaces `values` on every rank by their element-wise sum over the ranks. Every rank calls
    /// it with the same length, in the same order.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()>;
    /// The element-wise sum of `t` over the ranks (the same shape on every rank). By default
    /// through host memory; the NCCL backend reduces in device memory.
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let mut values = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.all_reduce_sum(&mut values)?;
        Ok(Tensor::from_vec(values, t.shape(), t.device())?.to_dtype(t.dtype())?)
    }
    /// Whether training exchanges gradients through this backend: with peers, and also when a
    /// cross-process backend was asked for by name on a world of one (a smoke test of it).
    fn reduces(&self) -> bool {
        self.world() > 1
    }
    /// Waits until every rank got here.
    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&mut [0.0])
    }
}

/// One process alone.
pub struct WorldOfOne;

impl Collective for WorldOfOne {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _values: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct Round {
    sum: Vec<f32>,
    arrived: usize,
    /// Ranks that took the result of the finished round.
    taken: usize,
    done: bool,
}

struct Group {
    world: usize,
    round: Mutex<Round>,
    changed: Condvar,
}

/// One rank of a group of threads.
pub struct InProcess {
    rank: usize,
    group: Arc<Group>,
}

/// `world` ranks that reduce with each other (hand one to each thread).
pub fn in_process_group(world: usize) -> Vec<InProcess> {
    let group = Arc::new(Group { world, round: Mutex::new(Round::default()), changed: Condvar::new() });
    (0..world).map(|rank| InProcess { rank, group: group.clone() }).collect()
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.group.world
    }
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        let g = &self.group;
        let mut r = g.round.lock().unwrap();
        // A round still being read out belongs to the previous call: wait for it to clear.
        while r.done {
            r = g.changed.wait(r).unwrap();
        }
        if r.arrived == 0 {
            r.sum = vec![0.0; values.len()];
        }
        anyhow::ensure!(r.sum.len() == values.len(), "rank {}: all-reduce of {} values, but another rank gave {}", self.rank, values.len(), r.sum.len());
        // Added in rank order would be deterministic; arrival order is what NCCL does not promise either.
        for (s, v) in r.sum.iter_mut().zip(values.iter()) {
            *s += v;
        }
        r.arrived += 1;
        if r.arrived == g.world {
            r.done = true;
            g.changed.notify_all();
        }
        while !r.done {
            r = g.changed.wait(r).unwrap();
        }
        values.copy_from_slice(&r.sum);
        r.taken += 1;
        if r.taken == g.world {
            *r = Round::default();
            g.changed.notify_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_get_the_sum_round_after_round() {
        let ranks = in_process_group(3);
        let results: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        (0..50)
                            .map(|round| {
                                let mut v = vec![c.rank() as f32 + round as f32, 1.0];
                                c.all_reduce_sum(&mut v).unwrap();
                                v
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for per_rank in &results {
            for (round, v) in per_rank.iter().enumerate() {
                assert_eq!(v, &vec![3.0 + 3.0 * round as f32, 3.0]);
            }
        }
        let mut one = [2.5f32];
        WorldOfOne.all_reduce_sum(&mut one).unwrap();
        assert_eq!(one, [2.5]);
    }
}
