//! Element-wise in-place updates of contiguous f32 CPU tensors, parallel over chunks: the fused
//! AdamW path (one pass per moment and one for the weight, instead of a dozen allocating tensor ops).

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 1 << 16;

/// Whether `t` can be updated in place by [`update2`] / [`update3`].
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<&'a [f32]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{name}: not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => candle_core::bail!("{name}: expected f32"),
    }
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, name: &str) -> Result<&'a mut [f32]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{name}: not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("{name}: expected f32"),
    }
}

fn same_len(a: usize, b: usize) -> Result<()> {
    if a != b {
        candle_core::bail!("in-place update: {a} elements against {b}");
    }
    Ok(())
}

struct Op2<F>(F);

impl<F: Fn(&mut f32, f32) + Sync> InplaceOp2 for Op2<F> {
    fn name(&self) -> &'static str {
        "inplace-update2"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (dst, a) = (slice_mut(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        same_len(dst.len(), a.len())?;
        dst.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).for_each(|(d, a)| d.iter_mut().zip(a).for_each(|(d, a)| (self.0)(d, *a)));
        Ok(())
    }
}

struct Op3<F>(F);

impl<F: Fn(&mut f32, f32, f32) + Sync> InplaceOp3 for Op3<F> {
    fn name(&self) -> &'static str {
        "inplace-update3"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<()> {
        let (dst, a, b) = (slice_mut(s1, l1, self.name())?, slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
        same_len(dst.len(), a.len())?;
        same_len(dst.len(), b.len())?;
        dst.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(d, (a, b))| d.iter_mut().zip(a.iter().zip(b)).for_each(|(d, (a, b))| (self.0)(d, *a, *b)));
        Ok(())
    }
}

/// `f(&mut dst[i], a[i])` for every element.
pub fn update2(dst: &Tensor, a: &Tensor, f: impl Fn(&mut f32, f32) + Sync) -> Result<()> {
    dst.inplace_op2(a, &Op2(f))
}

/// `f(&mut dst[i], a[i], b[i])` for every element.
pub fn update3(dst: &Tensor, a: &Tensor, b: &Tensor, f: impl Fn(&mut f32, f32, f32) + Sync) -> Result<()> {
    dst.inplace_op3(a, b, &Op3(f))
}
