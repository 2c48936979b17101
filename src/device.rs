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
        "auto" if CUDA_BUILT => {
            let dev = Device::cuda_if_available(0).unwrap_or(Device::Cpu);
            apply_switches(&dev)?;
            Ok(dev)
        }
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
            let dev = Device::new_cuda(ordinal).with_context(|| format!("device `{spec}`: cannot open GPU {ordinal}"))?;
            apply_switches(&dev)?;
            Ok(dev)
        }
    }
}

/// A CUDA driver entry point of the loaded `libcuda` (`None` on a CPU build or without a driver).
/// Looked up at run time, so these calls need no bindings and cost nothing on the CPU.
fn driver_fn(name: &std::ffi::CStr) -> Option<*mut libc::c_void> {
    // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches what the process loaded.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!f.is_null()).then_some(f)
}

/// Sets the device-wide effects of the speed switches for `dev`
/// ([`crate::switches::Switch::KeepPoolMemory`]: the default memory pool's release threshold,
/// everything when on, the driver's default 0 when off). A no-op on the CPU.
pub fn apply_switches(dev: &Device) -> Result<()> {
    let candle_core::DeviceLocation::Cuda { gpu_id } = dev.location() else { return Ok(()) };
    let pool = crate::switches::Switch::KeepPoolMemory;
    if !pool.on() && !pool.forced() {
        return Ok(()); // off and never turned on: the driver is not touched (the old path)
    }
    let (Some(get_device), Some(get_pool), Some(set_attribute)) =
        (driver_fn(c"cuDeviceGet"), driver_fn(c"cuDeviceGetDefaultMemPool"), driver_fn(c"cuMemPoolSetAttribute"))
    else {
        bail!("cuda:{gpu_id}: the CUDA driver's memory-pool calls are not available");
    };
    // CUresult cuDeviceGet(CUdevice*, int); cuDeviceGetDefaultMemPool(CUmemoryPool*, CUdevice);
    // cuMemPoolSetAttribute(CUmemoryPool, CUmemPool_attribute, void*).
    type GetDevice = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type GetPool = unsafe extern "C" fn(*mut *mut libc::c_void, i32) -> i32;
    type SetAttribute = unsafe extern "C" fn(*mut libc::c_void, i32, *mut libc::c_void) -> i32;
    const CU_MEMPOOL_ATTR_RELEASE_THRESHOLD: i32 = 4;
    let mut threshold: u64 = if pool.on() { u64::MAX } else { 0 };
    // SAFETY: the driver's documented signatures above; every out-pointer is a valid local.
    unsafe {
        let get_device = std::mem::transmute::<*mut libc::c_void, GetDevice>(get_device);
        let get_pool = std::mem::transmute::<*mut libc::c_void, GetPool>(get_pool);
        let set_attribute = std::mem::transmute::<*mut libc::c_void, SetAttribute>(set_attribute);
        let (mut device, mut pool) = (0i32, std::ptr::null_mut());
        let rc = get_device(&mut device, gpu_id as i32);
        let rc = if rc == 0 { get_pool(&mut pool, device) } else { rc };
        let rc = if rc == 0 { set_attribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut libc::c_void) } else { rc };
        anyhow::ensure!(rc == 0, "cuda:{gpu_id}: setting the memory pool's release threshold failed (CUresult {rc})");
    }
    Ok(())
}

/// Brackets a region for a profiler started with "profile from start off" (Nsight Compute's
/// `--profile-from-start off`, Nsight Systems' `--capture-range=cudaProfilerApi`). Returns
/// whether the driver took the call (false on the CPU).
pub fn profiler(start: bool) -> bool {
    let name: &std::ffi::CStr = if start { c"cuProfilerStart" } else { c"cuProfilerStop" };
    match driver_fn(name) {
        // SAFETY: CUresult cuProfilerStart(void) / cuProfilerStop(void).
        Some(f) => unsafe { std::mem::transmute::<*mut libc::c_void, unsafe extern "C" fn() -> i32>(f)() == 0 },
        None => false,
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
        // Nothing to set or bracket without a GPU.
        apply_switches(&Device::Cpu).unwrap();
        if !CUDA_BUILT {
            assert!(!profiler(true) && !profiler(false));
        }
    }
}
