//! Gradient checkpointing (diffusers' `enable_gradient_checkpointing`): a segment's forward keeps
//! only its output; backward recomputes the segment from its saved inputs. Candle has no hook for
//! this, so the segment becomes a custom op whose forward hands back the output computed outside
//! the graph and whose backward reruns the segment with gradients. The parameter gradients of that
//! inner backward are collected here and merged into the outer `GradStore` by [`Checkpointer::merge_into`].

use super::precomputed::Precomputed;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, Tensor, TensorId, Var};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// A checkpointed segment: `(hidden, time embedding, text context) -> hidden`.
pub type Segment = Arc<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Which tensors are parameters, and the gradients recomputed segments produced for them.
pub struct Checkpointer {
    params: HashSet<TensorId>,
    grads: Mutex<HashMap<TensorId, Tensor>>,
}

impl Checkpointer {
    pub fn new(params: &[Var]) -> Checkpointer {
        Checkpointer { params: params.iter().map(|v| v.as_tensor().id()).collect(), grads: Mutex::new(HashMap::new()) }
    }

    /// Runs `segment` on the inputs, keeping no activations for backward.
    pub fn apply(self: &Arc<Self>, segment: &Segment, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let output = segment(&x.detach(), &temb.detach(), &context.detach())?.detach();
        x.apply_op3_arc(temb, context, Arc::new(Box::new(Recompute { segment: segment.clone(), output: Precomputed::new("checkpointed segment", output)?, sink: self.clone() })))
    }

    /// Adds the collected parameter gradients to `grads` (call once after `loss.backward()`).
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        for (id, g) in self.grads.lock().unwrap().drain() {
            let sum = match grads.get_id(id) {
                Some(existing) => (existing + g)?,
                None => g,
            };
            grads.insert_id(id, sum);
        }
        Ok(())
    }

    fn absorb(&self, inner: &GradStore) -> Result<()> {
        let mut acc = self.grads.lock().unwrap();
        for id in inner.get_ids().filter(|id| self.params.contains(id)) {
            let g = inner.get_id(*id).expect("listed id").clone();
            let sum = match acc.remove(id) {
                Some(existing) => (existing + g)?,
                None => g,
            };
            acc.insert(*id, sum);
        }
        Ok(())
    }
}

struct Recompute {
    segment: Segment,
    output: Precomputed,
    sink: Arc<Checkpointer>,
}

impl CustomOp3 for Recompute {
    fn name(&self) -> &'static str {
        "checkpointed-segment"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(&self, x: &Tensor, temb: &Tensor, context: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xv, tv, cv) = (Var::from_tensor(&x.detach())?, Var::from_tensor(&temb.detach())?, Var::from_tensor(&context.detach())?);
        let y = (self.segment)(xv.as_tensor(), tv.as_tensor(), cv.as_tensor())?;
        let inner = (y * grad.detach())?.sum_all()?.backward()?;
        self.sink.absorb(&inner)?;
        let take = |v: &Var| inner.get(v.as_tensor()).cloned();
        Ok((take(&xv), take(&tv), take(&cv)))
    }
}
