//! LoRA on a loaded pipeline: the UNet (and optionally the text encoder) rebuilt over frozen
//! copies of their weights, with trainable adapters attached where the target set says. The
//! training models carry the adapter Vars; the inference models see detached views of them.

use super::Pipeline;
use crate::models::builder::Builder;
use crate::models::clip::ClipTextModel;
use crate::models::lora::{AdapterPlan, LoraConfig};
use crate::models::unet::UNet;
use crate::lora::{Format, LoraModule, LoraSet, Part};
use crate::models::lora::{DOWN, UP};
use crate::models::weights::frozen;
use crate::tensor::RawTensor;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// The adapters attached to a pipeline.
pub struct PipelineLora {
    pub config: LoraConfig,
    pub unet: Arc<AdapterPlan>,
    /// Present when the text encoder is adapted too.
    pub text: Option<Arc<AdapterPlan>>,
}

impl PipelineLora {
    /// Every adapter plan, for seeding dropout before a forward pass.
    pub fn plans(&self) -> impl Iterator<Item = &Arc<AdapterPlan>> {
        std::iter::once(&self.unet).chain(self.text.as_ref())
    }
}

impl Pipeline {
    /// Freezes the UNet (and with `text` the text encoder), holding their weights in
    /// `base_dtype`, and attaches new adapters from `config`. Afterwards `unet_vars` (and
    /// `text_vars` with `text`) hold only the adapters: what training updates and checkpoints.
    pub fn attach_lora(&mut self, config: &LoraConfig, text: bool, base_dtype: DType) -> Result<()> {
        let dev = self.device.clone();
        let base = frozen(&self.unet_vars, base_dtype)?;
        let plan = Arc::new(AdapterPlan::train(config.clone(), DType::F32));
        let build = |plan: Arc<AdapterPlan>| UNet::new(Builder::with_adapters(VarBuilder::from_tensors(base.clone(), base_dtype, &dev), plan), &self.unet_config);
        self.unet = build(plan.clone())?;
        self.inference.unet = build(Arc::new(plan.views()))?;
        self.unet_vars = plan.vars().expect("a training plan").clone();
        let text_plan = if text {
            let base = frozen(&self.text_vars, DType::F32)?;
            let plan = Arc::new(AdapterPlan::train(config.clone(), DType::F32));
            let build = |plan: Arc<AdapterPlan>| ClipTextModel::new(Builder::with_adapters(VarBuilder::from_tensors(base.clone(), DType::F32, &dev), plan), &self.text_config);
            self.text = build(plan.clone())?;
            self.inference.text = build(Arc::new(plan.views()))?;
            self.text_vars = plan.vars().expect("a training plan").clone();
            Some(plan)
        } else {
            None
        };
        self.lora = Some(PipelineLora { config: config.clone(), unet: plan, text: text_plan });
        Ok(())
    }
}

impl Pipeline {
    /// The attached adapters as a LoRA set (f32), keyed by diffusers module path. Refuses any
    /// factor holding NaN or infinity.
    pub fn lora_set(&self) -> Result<LoraSet> {
        let lora = self.lora.as_ref().context("no LoRA adapters are attached")?;
        let mut set = LoraSet { modules: Default::default(), format: Format::Diffusers, metadata: Default::default() };
        let parts = [(Part::Unet, &self.unet_vars)].into_iter().chain(lora.text.as_ref().map(|_| (Part::TextEncoder, &self.text_vars)));
        for (part, vars) in parts {
            let data = vars.data().lock().unwrap();
            for (key, down) in data.iter() {
                let Some(module) = key.strip_suffix(&format!(".{DOWN}")) else { continue };
                let up = data.get(&format!("{module}.{UP}")).with_context(|| format!("adapter `{module}` has no up factor"))?;
                let raw = |t: &Tensor, name: &str| -> Result<RawTensor> {
                    let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    ensure!(values.iter().all(|v| v.is_finite()), "adapter `{module}.{name}` holds NaN or infinite values; not written");
                    Ok(RawTensor::from_f32(t.dims(), &values))
                };
                let m = LoraModule { down: raw(down.as_tensor(), DOWN)?, up: raw(up.as_tensor(), UP)?, alpha: lora.config.alpha };
                set.modules.insert((part, module.to_string()), m);
            }
        }
        Ok(set)
    }
}
