//! Candle custom ops get storages, not tensors, in their forward pass. Our ops with hand-written
//! backward passes (attention, conv, normalisation, checkpointed segments) compute their result
//! with ordinary tensor ops outside the graph, then let the custom op hand that result over as its
//! output, so the graph records one node whose backward is ours.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

/// A result computed outside the graph, given to the custom op's forward exactly once.
pub struct Precomputed {
    name: &'static str,
    output: Mutex<Option<Tensor>>,
}

impl Precomputed {
    pub fn new(name: &'static str, output: Tensor) -> Result<Precomputed> {
        let output = if output.layout().is_contiguous() && output.layout().start_offset() == 0 { output } else { output.copy()? };
        Ok(Precomputed { name, output: Mutex::new(Some(output)) })
    }

    fn take(&self) -> Result<Tensor> {
        self.output.lock().unwrap().take().ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))
    }

    /// For `cpu_fwd`.
    pub fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let out = self.take()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{}: the result is not on the CPU", self.name),
        }
    }

    /// For `cuda_fwd`.
    pub fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        let out = self.take()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{}: the result is not on the GPU", self.name),
        }
    }
}
