//! Runs one of our training models on inputs from a safetensors file (parity checks against
//! diffusers/transformers): `dreambridge forward unet|text-encoder --model DIR --inputs F --out F`.

use super::clip::{ClipTextConfig, ClipTextModel};
use super::unet::{UNet, UNetConfig};
use super::vae::{Vae, VaeConfig};
use super::weights::load_into;
use crate::diffusers::layout::{find_weights, Component};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::Path;

fn config<T: serde::de::DeserializeOwned>(dir: &Path, component: Component) -> Result<T> {
    let path = dir.join(component.dir()).join("config.json");
    serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| path.display().to_string())?).with_context(|| path.display().to_string())
}

/// Inputs: unet `sample`, `timesteps`, `context`; text-encoder `input_ids` (and optionally
/// transformers' `attention_mask`); vae-encode `image`
/// (output: latent mean); vae-decode `latents`. Output: `out` (f32).
/// `loras` (with `scales`, as `merge_files_into_vars` takes them) are folded into the weights.
pub fn run(component: &str, model: &Path, loras: &[std::path::PathBuf], scales: &[f64], inputs: &Path, out: &Path, dev: &Device) -> Result<()> {
    let dev = dev.clone();
    let x = candle_core::safetensors::load(inputs, &dev).with_context(|| inputs.display().to_string())?;
    let get = |k: &str| x.get(k).with_context(|| format!("{}: no `{k}`", inputs.display()));
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let result = match component {
        "unet" => {
            let net = UNet::new(vb, &config::<UNetConfig>(model, Component::Unet)?)?;
            load_into(&varmap, &find_weights(model, Component::Unet)?, "")?;
            crate::lora::merge::merge_files_into_vars(loras, scales, Some(&varmap), None)?;
            net.forward(&get("sample")?.to_dtype(DType::F32)?, &get("timesteps")?.to_dtype(DType::F32)?, get("context")?)?
        }
        "text-encoder" => {
            let net = ClipTextModel::new(vb, &config::<ClipTextConfig>(model, Component::TextEncoder)?)?;
            load_into(&varmap, &find_weights(model, Component::TextEncoder)?, "text_model.")?;
            crate::lora::merge::merge_files_into_vars(loras, scales, None, Some(&varmap))?;
            let mask = x.get("attention_mask").map(|m| m.to_dtype(DType::F32)).transpose()?;
            net.forward_masked(&get("input_ids")?.to_dtype(DType::U32)?, mask.as_ref(), DType::F32)?
        }
        "vae-encode" | "vae-decode" => {
            let net = Vae::new(vb, &config::<VaeConfig>(model, Component::Vae)?)?;
            load_into(&varmap, &find_weights(model, Component::Vae)?, "")?;
            if component == "vae-encode" {
                net.encode(&get("image")?.to_dtype(DType::F32)?)?.0
            } else {
                net.decode(&get("latents")?.to_dtype(DType::F32)?)?
            }
        }
        "train-step" => return train_step(model, &x, out, &dev),
        other => bail!("unknown component `{other}` (unet, text-encoder, vae-encode, vae-decode, train-step)"),
    };
    candle_core::safetensors::save(&HashMap::from([("out".to_string(), result.to_dtype(DType::F32)?)]), out)?;
    Ok(())
}

/// One DreamBooth training step (prior preservation, weight 1; clip 1.0; AdamW lr 1e-3, wd 1e-2)
/// on given `latents`, `noise`, `timesteps`, `context`: writes `loss` and every updated weight.
fn train_step(model: &Path, x: &HashMap<String, candle_core::Tensor>, out: &Path, dev: &Device) -> Result<()> {
    use crate::train::loss::{dreambooth_loss, LossConfig};
    use crate::train::optim::{clip_grad_norm, AdamW, AdamWParams};
    use crate::pipeline::schedule::{NoiseSchedule, ScheduleConfig};
    let dev = dev.clone();
    let get = |k: &str| x.get(k).with_context(|| format!("no `{k}`"));
    let varmap = VarMap::new();
    let net = UNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &config::<UNetConfig>(model, Component::Unet)?)?;
    load_into(&varmap, &find_weights(model, Component::Unet)?, "")?;
    let schedule = NoiseSchedule::new(&serde_json::from_str::<ScheduleConfig>("{}")?)?;
    let timesteps: Vec<usize> = get("timesteps")?.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().map(|t| *t as usize).collect();
    let cfg = LossConfig { with_prior_preservation: true, prior_loss_weight: 1.0, snr_gamma: None };
    let loss = dreambooth_loss(&net, &schedule, get("latents")?, get("context")?, get("noise")?, &timesteps, &cfg)?;
    let mut grads = loss.backward()?;
    let vars: Vec<(String, candle_core::Var)> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    clip_grad_norm(&mut grads, &vars.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(), 1.0)?;
    let mut opt = AdamW::new(vars.clone(), AdamWParams { lr: 1e-3, weight_decay: 1e-2, ..Default::default() })?;
    opt.step(&grads, 1e-3)?;
    let mut result: HashMap<String, candle_core::Tensor> = vars.into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
    result.insert("loss".into(), loss.reshape(1)?);
    candle_core::safetensors::save(&result, out)?;
    Ok(())
}
