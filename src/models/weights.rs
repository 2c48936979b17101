//! Loading diffusers / transformers safetensors into a VarMap by key, in any stored dtype
//! (f16/bf16/f32) into the VarMap's training dtype.

use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_nn::VarMap;
use std::path::Path;

/// The Vars' values as plain tensors in `dtype` (sharing storage when the dtype is the same):
/// frozen weights, which get no gradient.
pub fn frozen(vars: &VarMap, dtype: candle_core::DType) -> candle_core::Result<std::collections::HashMap<String, candle_core::Tensor>> {
    let data = vars.data().lock().unwrap();
    data.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().to_dtype(dtype)?))).collect()
}

/// Sets every Var of `varmap` from `file`; keys may lack `strip_prefix` in the file (transformers 5
/// writes CLIP keys without `text_model.`). Every Var must be found with its shape.
pub fn load_into(varmap: &VarMap, file: &Path, strip_prefix: &str) -> Result<()> {
    // SAFETY: read-only map of a file not modified while loading.
    let st = unsafe { MmapedSafetensors::new(file) }.with_context(|| file.display().to_string())?;
    let names: std::collections::HashSet<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    let vars = varmap.data().lock().unwrap();
    let mut missing = Vec::new();
    for (name, var) in vars.iter() {
        let key = if names.contains(name) { name.clone() } else { name.strip_prefix(strip_prefix).unwrap_or(name).to_string() };
        if !names.contains(&key) {
            missing.push(name.clone());
            continue;
        }
        let t = st.load(&key, var.device()).with_context(|| format!("{}: tensor `{key}`", file.display()))?;
        if t.dims() != var.dims() {
            bail!("{}: tensor `{key}` has shape {:?}, the model wants {:?}", file.display(), t.dims(), var.dims());
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    if !missing.is_empty() {
        bail!("{}: missing {} tensors, e.g. {}", file.display(), missing.len(), missing.iter().take(3).cloned().collect::<Vec<_>>().join(", "));
    }
    Ok(())
}
