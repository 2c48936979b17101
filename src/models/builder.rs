//! Where a model's layers get their weights: a candle `VarBuilder`, and optionally the LoRA
//! adapters to attach to the layers it builds (see [`super::lora`]). It dereferences to the
//! `VarBuilder`, so layer code reads tensors as it would from candle's.

use super::lora::{Adapter, AdapterPlan, AdapterShape};
use candle_core::Result;
use candle_nn::VarBuilder;
use std::sync::Arc;

#[derive(Clone)]
pub struct Builder<'a> {
    vb: VarBuilder<'a>,
    adapters: Option<Arc<AdapterPlan>>,
}

impl<'a> Builder<'a> {
    /// Layers get LoRA adapters where `plan` targets them.
    pub fn with_adapters(vb: VarBuilder<'a>, plan: Arc<AdapterPlan>) -> Builder<'a> {
        Builder { vb, adapters: Some(plan) }
    }

    /// The builder for the sub-module `name` (diffusers' dotted key path).
    pub fn pp(&self, name: impl ToString) -> Builder<'a> {
        Builder { vb: self.vb.pp(name), adapters: self.adapters.clone() }
    }

    /// This module's adapter, if the plan targets it.
    pub fn adapter(&self, shape: AdapterShape) -> Result<Option<Adapter>> {
        match &self.adapters {
            Some(plan) => plan.adapter(&self.vb.prefix(), shape, self.vb.device()),
            None => Ok(None),
        }
    }
}

impl<'a> From<VarBuilder<'a>> for Builder<'a> {
    fn from(vb: VarBuilder<'a>) -> Builder<'a> {
        Builder { vb, adapters: None }
    }
}

impl<'a> std::ops::Deref for Builder<'a> {
    type Target = VarBuilder<'a>;

    fn deref(&self) -> &VarBuilder<'a> {
        &self.vb
    }
}
