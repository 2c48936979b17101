//! The GPU backend: NCCL through candle's cudarc bindings (the `nccl` cargo feature). One
//! process per GPU; rank 0 makes the NCCL id and hands it to the others over the TCP star, then
//! every rank joins the communicator on its own device's stream. Tensors on the GPU are reduced
//! in place in device memory (no copy through the host).

use super::collective::Collective;
use super::tcp::{Rendezvous, Star};
use anyhow::{bail, Context, Result};
use candle_core::{CudaStorage, Device, Layout, Tensor};
use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use std::sync::Mutex;

pub struct Nccl {
    comm: Mutex<Comm>,
    device: Device,
    rank: usize,
    world: usize,
}

// SAFETY: the communicator is a handle NCCL lets any one thread use at a time; the Mutex makes
// every use exclusive, and the stream it runs on is the device's own (Send + Sync in cudarc).
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Joins `world` ranks on `device` (this rank's GPU).
    pub fn connect(device: &Device, rank: usize, world: usize, rv: &Rendezvous) -> Result<Nccl> {
        let Device::Cuda(cuda) = device else { bail!("the NCCL backend needs a GPU device (got the CPU); use --dist-backend tcp on the CPU") };
        let star = Star::join(rank, world, rv)?;
        let mut bytes = [0u8; 128];
        if rank == 0 {
            let id = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
            for (b, c) in bytes.iter_mut().zip(id.internal()) {
                *b = *c as u8;
            }
        }
        star.broadcast(&mut bytes).context("sharing the NCCL id")?;
        let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, world, id).map_err(|e| anyhow::anyhow!("rank {rank}: ncclCommInitRank over {world} ranks: {e:?}"))?;
        Ok(Nccl { comm: Mutex::new(comm), device: device.clone(), rank, world })
    }
}

/// The in-place sum as a candle op, so it runs on the tensor's own device buffer.
struct AllReduce<'a>(&'a Comm);

impl candle_core::InplaceOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }
    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("nccl-all-reduce: the tensor is on the CPU")
    }
    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("nccl-all-reduce: the tensor is not contiguous") };
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        let mut view = slice.slice_mut(start..end);
        self.0.all_reduce_in_place(&mut view, &ReduceOp::Sum).map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        Ok(())
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn reduces(&self) -> bool {
        true
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        let t = Tensor::new(&*values, &self.device)?;
        let summed = self.all_reduce_tensor(&t)?;
        values.copy_from_slice(&summed.to_vec1::<f32>()?);
        Ok(())
    }
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        // A fresh contiguous f32 copy on this GPU: the caller's tensor is left as it was.
        let buf = t.to_device(&self.device)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.copy()?;
        buf.inplace_op1(&AllReduce(&self.comm.lock().unwrap()))?;
        Ok(buf.reshape(t.shape())?.to_dtype(t.dtype())?.to_device(t.device())?)
    }
}
