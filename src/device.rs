//! Picking the compute device (`--device auto|cpu|cuda[:N]`) and the CUDA GEMM precision.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// Whether this binary was built with the `cuda` feature (scripts/build-cuda.sh).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// `auto` (the first GPU when this is a CUDA build and one is present, else the CPU), `cpu`,
/// `cuda` or `cuda:N`.
pub fn parse(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" if CUDA_BUILT => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        "auto" => Ok(Device::Cpu),
        _ => {
            let Some(rest) = spec.strip_prefix("cuda") else { bail!("unknown device `{spec}` (auto, cpu, cuda, cuda:N)") };
            let ordinal = match rest.strip_prefix(':') {
                Some(n) => n.parse().with_context(|| format!("device `{spec}`: `{n}` is not a GPU number"))?,
                None if rest.is_empty() => 0,
                None => bail!("unknown device `{spec}` (auto, cpu, cuda, cuda:N)"),
            };
            if !CUDA_BUILT {
                bail!("device `{spec}`: this dreambridge was built without CUDA; build the GPU binary with scripts/build-cuda.sh");
            }
            Device::new_cuda(ordinal).with_context(|| format!("device `{spec}`: cannot open GPU {ordinal}"))
        }
    }
}

/// A short name for reports: `cpu` or `cuda:N`.
pub fn describe(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Lets f32 GEMMs (and the im2col convolutions built on them) use TF32 tensor cores, as
/// diffusers' `--allow_tf32`; a no-op on the CPU.
pub fn allow_tf32(on: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert!(parse("gpu").is_err());
        assert!(parse("cuda:x").unwrap_err().to_string().contains("not a GPU number"));
        if !CUDA_BUILT {
            assert!(parse("auto").unwrap().is_cpu());
            assert!(parse("cuda:0").unwrap_err().to_string().contains("scripts/build-cuda.sh"));
        }
        assert_eq!(describe(&Device::Cpu), "cpu");
    }
}
