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

/// Whether `key` is a normalisation's weight or bias: the norms compute in f32, so these stay f32
/// when the other weights are held in a lower compute dtype.
pub fn is_norm_parameter(key: &str) -> bool {
    key.rsplit('.').nth(1).is_some_and(|module| module.contains("norm"))
}

/// The Vars' values for inference in `dtype`, cast once: every tensor but the norms' parameters
/// (see [`is_norm_parameter`]) in `dtype`, those in f32. Build models over them with
/// [`as_stored`].
pub fn cast_for_compute(vars: &VarMap, dtype: candle_core::DType) -> candle_core::Result<std::collections::HashMap<String, candle_core::Tensor>> {
    let data = vars.data().lock().unwrap();
    data.iter()
        .map(|(k, v)| {
            let t = v.as_tensor().detach();
            Ok((k.clone(), if is_norm_parameter(k) { t } else { t.to_dtype(dtype)? }))
        })
        .collect()
}

/// A VarBuilder that hands out `tensors` in the dtype each is stored in (candle's converts every
/// tensor to the builder's dtype), checking shapes.
pub fn as_stored(tensors: std::collections::HashMap<String, candle_core::Tensor>, dtype: candle_core::DType, device: &candle_core::Device) -> candle_nn::VarBuilder<'static> {
    struct AsStored(std::collections::HashMap<String, candle_core::Tensor>);
    impl candle_nn::var_builder::SimpleBackend for AsStored {
        fn get(&self, s: candle_core::Shape, name: &str, _: candle_nn::Init, dtype: candle_core::DType, dev: &candle_core::Device) -> candle_core::Result<candle_core::Tensor> {
            let t = self.get_unchecked(name, dtype, dev)?;
            if t.shape() != &s {
                candle_core::bail!("tensor `{name}` has shape {:?}, the model wants {:?}", t.dims(), s.dims());
            }
            Ok(t)
        }
        fn get_unchecked(&self, name: &str, _: candle_core::DType, dev: &candle_core::Device) -> candle_core::Result<candle_core::Tensor> {
            match self.0.get(name) {
                Some(t) => t.to_device(dev),
                None => candle_core::bail!("no tensor `{name}`"),
            }
        }
        fn contains_tensor(&self, name: &str) -> bool {
            self.0.contains_key(name)
        }
    }
    candle_nn::VarBuilder::from_backend(Box::new(AsStored(tensors)), dtype, device.clone())
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
