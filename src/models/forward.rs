//! Runs one of our training models on inputs from a safetensors file (parity checks against
//! diffusers/transformers): `dreambridge forward unet|text-encoder --model DIR --inputs F --out F`.

use super::clip::{ClipTextConfig, ClipTextModel};
use super::unet::{AddedCond, UNet, UNetConfig};
use super::vae::{Vae, VaeConfig};
use super::weights::load_into;
use crate::diffusers::layout::{find_weights, find_weights_of, Component};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::Path;

fn config<T: serde::de::DeserializeOwned>(dir: &Path, component: Component) -> Result<T> {
    let path = dir.join(component.dir()).join("config.json");
    serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| path.display().to_string())?).with_context(|| path.display().to_string())
}

/// Inputs: unet `sample`, `timesteps`, `context` (SDXL: also `text_embeds` and `time_ids`);
/// text-encoder `input_ids` (and optionally transformers' `attention_mask`), text-encoder-2
/// (SDXL's `text_encoder_2`) `input_ids`; vae-encode `image` (output: latent mean); vae-decode
/// `latents`. Output: `out` (f32); the text encoders without a mask also write `penultimate`
/// (`hidden_states[-2]`) and `pooled` (text-encoder-2: the projected `text_embeds`).
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
            let added = match (x.get("text_embeds"), x.get("time_ids")) {
                (Some(text_embeds), Some(time_ids)) => Some(AddedCond { text_embeds: text_embeds.to_dtype(DType::F32)?, time_ids: time_ids.to_dtype(DType::F32)? }),
                _ => None,
            };
            net.forward_added(&get("sample")?.to_dtype(DType::F32)?, &get("timesteps")?.to_dtype(DType::F32)?, get("context")?, added.as_ref())?
        }
        "text-encoder" | "text-encoder-2" => {
            let second = component == "text-encoder-2";
            let (folder, file) = if second { ("text_encoder_2", "model.safetensors") } else { (Component::TextEncoder.dir(), "model.safetensors") };
            let path = model.join(folder).join("config.json");
            let c: ClipTextConfig = serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| path.display().to_string())?).with_context(|| path.display().to_string())?;
            let net = if second { ClipTextModel::with_projection(vb, &c)? } else { ClipTextModel::new(vb, &c)? };
            load_into(&varmap, &find_weights_of(model, folder, file)?, "text_model.")?;
            if !second {
                crate::lora::merge::merge_files_into_vars(loras, scales, None, Some(&varmap))?;
            } else if !loras.is_empty() {
                bail!("forward text-encoder-2: --lora is not supported for the second text encoder");
            }
            let ids = get("input_ids")?.to_dtype(DType::U32)?;
            match x.get("attention_mask") {
                Some(mask) => net.forward_masked(&ids, Some(&mask.to_dtype(DType::F32)?), DType::F32)?,
                None => {
                    let hidden = net.forward_hidden(&ids, DType::F32)?;
                    let tensors = HashMap::from([
                        ("out".to_string(), net.forward(&ids, DType::F32)?),
                        ("penultimate".to_string(), hidden.penultimate),
                        ("pooled".to_string(), hidden.pooled),
                    ]);
                    candle_core::safetensors::save(&tensors, out)?;
                    return Ok(());
                }
            }
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
        other => bail!("unknown component `{other}` (unet, text-encoder, text-encoder-2, vae-encode, vae-decode, train-step)"),
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
