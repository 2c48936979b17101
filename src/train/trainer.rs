//! The training loop over cached latent distributions and text embeddings: per-sample timesteps,
//! noise (and offset noise) from the checkpointed RNG, DreamBooth loss, gradient accumulation,
//! global grad-norm clipping, the LR schedule, AdamW, and checkpoints that resume exactly. A stop
//! request (SIGINT/SIGTERM) ends the run after the current step with a checkpoint; a loss or
//! gradient that is not finite (outside fp16 loss scaling) ends it before the weights change.

use super::checkpoint::{self, TrainState};
use super::interrupt::{Interrupted, StopRequest};
use super::loss_scale::LossScaler;
use super::loss::{dreambooth_loss, LossConfig};
use super::optim::{clip_factor, grad_norm, AdamWParams, LrSchedule, Optimizer};
use crate::rng::TrainRng;
use crate::pipeline::schedule::NoiseSchedule;
use crate::models::clip::ClipTextModel;
use crate::models::unet::UNet;
use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::PathBuf;

/// One training image: its cached latent distribution (already × scaling factor), its prompt
/// embedding (frozen text encoder) and its prompt's token ids (for text-encoder training).
#[derive(Clone)]
pub struct Example {
    pub latent_mean: Tensor,
    pub latent_std: Tensor,
    pub context: Tensor,
    pub ids: Option<Tensor>,
    /// The prompt's attention mask, given to a trained text encoder (`--text_encoder_use_attention_mask`).
    pub attention_mask: Option<Tensor>,
}

#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub max_train_steps: usize,
    pub train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub lr_scheduler: LrSchedule,
    pub lr_warmup_steps: usize,
    pub max_grad_norm: f64,
    pub adam: AdamWParams,
    /// 8-bit block-wise AdamW moments (`--use_8bit_adam`).
    pub use_8bit_adam: bool,
    pub loss: LossConfig,
    pub noise_offset: f64,
    pub checkpointing_steps: Option<usize>,
    pub checkpoints_total_limit: Option<usize>,
    pub checkpoint_dir: PathBuf,
    pub seed: u64,
    /// UNet compute dtype (weights stay f32): F32, F16 or BF16 (CUDA only).
    pub compute_dtype: candle_core::DType,
}

pub struct Trainer<'a> {
    pub unet: &'a UNet,
    pub varmap: &'a VarMap,
    /// The text encoder and its Vars, when it is trained too.
    text: Option<(&'a ClipTextModel, &'a VarMap)>,
    pub schedule: &'a NoiseSchedule,
    pub config: TrainConfig,
    pub optimizer: Optimizer,
    pub rng: TrainRng,
    pub step: usize,
    /// Present when computing in f16.
    pub scaler: Option<LossScaler>,
    /// Optimiser steps skipped because fp16 gradients overflowed.
    pub skipped_steps: usize,
    /// Checked after every step: set, the run checkpoints and returns [`Interrupted`].
    pub stop: StopRequest,
    /// LoRA adapter plans, told the micro-batch index before each forward (it seeds dropout, so a
    /// resumed run draws the same masks).
    pub adapters: Vec<std::sync::Arc<crate::models::lora::AdapterPlan>>,
    /// Data parallelism: this rank's group. Each optimiser step's global batch (train_batch_size
    /// x world) is drawn from the one RNG stream every rank holds, each rank computes its shard,
    /// and the gradients are averaged over the ranks; only rank 0 writes checkpoints.
    pub collective: std::sync::Arc<dyn crate::scale::collective::Collective>,
}

impl<'a> Trainer<'a> {
    pub fn new(unet: &'a UNet, varmap: &'a VarMap, schedule: &'a NoiseSchedule, config: TrainConfig) -> Result<Trainer<'a>> {
        let vars: Vec<(String, Var)> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let optimizer = Optimizer::new(vars, config.adam, config.use_8bit_adam)?;
        let rng = TrainRng::new(config.seed);
        let scaler = (config.compute_dtype == candle_core::DType::F16).then(LossScaler::default);
        Ok(Trainer { unet, varmap, text: None, schedule, config, optimizer, rng, step: 0, scaler, skipped_steps: 0, stop: StopRequest::default(), adapters: Vec::new(), collective: std::sync::Arc::new(crate::scale::collective::WorldOfOne) })
    }

    /// Trains the text encoder too: prompt embeddings are recomputed each step, with gradients.
    pub fn with_text_encoder(mut self, text: &'a ClipTextModel, text_vars: &'a VarMap) -> Result<Trainer<'a>> {
        self.text = Some((text, text_vars));
        self.optimizer = Optimizer::new(self.trainable(), self.config.adam, self.config.use_8bit_adam)?;
        Ok(self)
    }

    /// Every trained Var, by name (UNet keys and `text_model.*` keys do not collide).
    fn trainable(&self) -> Vec<(String, Var)> {
        let mut all: Vec<(String, Var)> = self.varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some((_, tv)) = self.text {
            all.extend(tv.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        // By name: every rank walks its Vars in the same order (the all-reduce pairs them up).
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Continues from a checkpoint (`latest` or a folder).
    pub fn resume(&mut self, spec: &str) -> Result<()> {
        let (weights, optimizer, state) = checkpoint::load(&self.config.checkpoint_dir, spec)?;
        for (name, var) in self.trainable() {
            let t = weights.get(&name).ok_or_else(|| anyhow::anyhow!("checkpoint lacks `{name}`"))?;
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        self.optimizer.load_state(&optimizer, state.step)?;
        self.rng.state = state.rng_state;
        if let (Some(s), Some(scale)) = (self.scaler.as_mut(), state.loss_scale) {
            s.scale = scale;
        }
        self.step = state.step;
        Ok(())
    }

    fn save_checkpoint(&self) -> Result<PathBuf> {
        let weights: HashMap<String, Tensor> = self.trainable().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        let state = TrainState { step: self.step, rng_state: self.rng.state, loss_scale: self.scaler.as_ref().map(|s| s.scale) };
        checkpoint::save(&self.config.checkpoint_dir, &weights, &self.optimizer.state(), &state, self.config.checkpoints_total_limit)
    }

    /// Draws one micro-batch of the global batch (instance examples, then as many class examples
    /// with prior preservation) and returns this rank's shard of it: every draw is made for the
    /// whole global batch, so the shards of any world size add up to the same batch.
    fn micro_batch(&mut self, instances: &[Example], classes: &[Example]) -> Result<(Tensor, Tensor, Tensor, Vec<usize>)> {
        let (rank, world) = (self.collective.rank(), self.collective.world());
        let (b, global) = (self.config.train_batch_size, self.config.train_batch_size * world);
        let mut picked: Vec<&Example> = (0..global).map(|_| &instances[self.rng.below(instances.len())]).collect();
        let mut shard: Vec<usize> = (rank * b..(rank + 1) * b).collect();
        if self.config.loss.with_prior_preservation {
            let class: Vec<&Example> = (0..global).map(|_| &classes[self.rng.below(classes.len())]).collect();
            picked.extend(class);
            shard.extend((rank * b..(rank + 1) * b).map(|i| global + i));
        }
        let dev = picked[0].latent_mean.device().clone();
        let mean = Tensor::stack(&picked.iter().map(|e| e.latent_mean.clone()).collect::<Vec<_>>(), 0)?;
        let std = Tensor::stack(&picked.iter().map(|e| e.latent_std.clone()).collect::<Vec<_>>(), 0)?;
        let mine: Vec<&Example> = shard.iter().map(|&i| picked[i]).collect();
        let context = match self.text {
            Some((text, _)) => {
                let ids = mine.iter().map(|e| e.ids.clone().ok_or_else(|| anyhow::anyhow!("text-encoder training needs token ids"))).collect::<Result<Vec<_>>>()?;
                let masks: Option<Vec<Tensor>> = mine.iter().map(|e| e.attention_mask.clone()).collect();
                let mask = masks.map(|m| Tensor::stack(&m, 0)).transpose()?;
                text.forward_masked(&Tensor::stack(&ids, 0)?, mask.as_ref(), candle_core::DType::F32)?
            }
            None => Tensor::stack(&mine.iter().map(|e| e.context.clone()).collect::<Vec<_>>(), 0)?,
        };
        let shape = mean.dims().to_vec();
        let latents = (&mean + (std * self.rng.normal(&shape, &dev)?.to_dtype(mean.dtype())?)?)?;
        let mut noise = self.rng.normal(&shape, &dev)?.to_dtype(mean.dtype())?;
        if self.config.noise_offset > 0.0 {
            let offset = self.rng.normal(&[shape[0], shape[1], 1, 1], &dev)?.to_dtype(mean.dtype())?;
            noise = noise.broadcast_add(&(offset * self.config.noise_offset)?)?;
        }
        let n = self.schedule.alphas_cumprod.len();
        let timesteps: Vec<usize> = (0..shape[0]).map(|_| self.rng.below(n)).collect();
        let dt = self.config.compute_dtype;
        if world == 1 {
            return Ok((latents.to_dtype(dt)?, noise.to_dtype(dt)?, context.to_dtype(dt)?, timesteps));
        }
        let rows = Tensor::new(shard.iter().map(|&i| i as u32).collect::<Vec<_>>().as_slice(), &dev)?;
        let timesteps = shard.iter().map(|&i| timesteps[i]).collect();
        Ok((latents.index_select(&rows, 0)?.to_dtype(dt)?, noise.index_select(&rows, 0)?.to_dtype(dt)?, context.to_dtype(dt)?, timesteps))
    }

    /// Trains up to `max_train_steps` (or `stop_at`), calling `on_step(step, loss, lr)`; returns the losses.
    pub fn run(&mut self, instances: &[Example], classes: &[Example], stop_at: Option<usize>, mut on_step: impl FnMut(usize, f32, f64)) -> Result<Vec<f32>> {
        let vars: Vec<Var> = self.trainable().into_iter().map(|(_, v)| v).collect();
        let c = self.config.clone();
        let mut losses = Vec::new();
        let end = stop_at.unwrap_or(c.max_train_steps).min(c.max_train_steps);
        while self.step < end {
            let mut total: Option<GradStore> = None;
            let mut loss_sum = 0f32;
            for micro in 0..c.gradient_accumulation_steps {
                for plan in &self.adapters {
                    plan.set_draw((self.step * c.gradient_accumulation_steps + micro) as u64);
                }
                let (latents, noise, context, t) = self.micro_batch(instances, classes)?;
                let loss = (dreambooth_loss(self.unet, self.schedule, &latents, &context, &noise, &t, &c.loss)? / c.gradient_accumulation_steps as f64)?;
                loss_sum += loss.to_scalar::<f32>()?;
                let grads = match &self.scaler {
                    Some(s) => self.unet.backward(&(&loss * s.scale)?)?,
                    None => self.unet.backward(&loss)?,
                };
                total = Some(match total {
                    None => grads,
                    Some(mut acc) => {
                        for v in &vars {
                            if let Some(g) = grads.get(v.as_tensor()) {
                                let sum = match acc.remove(v.as_tensor()) {
                                    Some(a) => (a + g)?,
                                    None => g.clone(),
                                };
                                acc.insert(v.as_tensor(), sum);
                            }
                        }
                        acc
                    }
                });
            }
            let mut grads = total.expect("at least one micro-batch");
            // Across ranks the stop request is read once, before the all-reduce that shares it.
            let mut stop_now = None;
            if self.collective.reduces() {
                let own = self.stop.signal();
                let any;
                (loss_sum, any) = self.average_over_ranks(&mut grads, &vars, loss_sum, own.is_some())?;
                stop_now = own.or(any.then_some(15));
            }
            // Unscaling (fp16) and clipping are folded into the optimiser's gradient factor.
            let loss_scale = self.scaler.as_ref().map_or(1.0, |s| s.scale);
            let norm = grad_norm(&grads, &vars)? / loss_scale;
            if self.scaler.is_none() && !(loss_sum.is_finite() && norm.is_finite()) {
                bail!("{}", self.non_finite(loss_sum, norm)?);
            }
            let lr = c.learning_rate * c.lr_scheduler.factor(self.step, c.lr_warmup_steps, c.max_train_steps);
            if self.scaler.as_mut().map_or(true, |s| s.update(norm.is_finite())) {
                self.optimizer.step_scaled(&grads, lr, clip_factor(norm, c.max_grad_norm) / loss_scale)?;
            } else {
                self.skipped_steps += 1;
            }
            self.step += 1;
            losses.push(loss_sum);
            on_step(self.step, loss_sum, lr);
            let saved = match c.checkpointing_steps.is_some_and(|n| self.step % n == 0) && self.collective.rank() == 0 {
                true => Some(self.save_checkpoint()?),
                false => None,
            };
            // Alone: a request that came at any time up to here; with peers: one any rank had
            // when the step's all-reduce ran (a peer's counts as SIGTERM).
            let stop = if self.collective.reduces() { stop_now } else { self.stop.signal() };
            if let Some(signal) = stop {
                let checkpoint = match saved {
                    Some(path) => Some(path),
                    None if self.collective.rank() == 0 => Some(self.save_checkpoint()?),
                    None => None,
                };
                return Err(Interrupted { signal, step: self.step, checkpoint }.into());
            }
        }
        Ok(losses)
    }

    /// Sums every gradient, the loss and the stop requests over the ranks in one all-reduce (one
    /// flat f32 bucket) and divides by the world size: the gradient of the global batch's loss,
    /// the same on every rank. Returns the mean loss and whether any rank was asked to stop, so
    /// that every rank stops after the same step.
    fn average_over_ranks(&self, grads: &mut GradStore, vars: &[Var], loss: f32, stopping: bool) -> Result<(f32, bool)> {
        let world = self.collective.world() as f64;
        // A Var without a gradient here has none on any rank (same graph): it stays absent.
        let present: Vec<(&Var, Tensor)> = vars.iter().filter_map(|v| grads.remove(v.as_tensor()).map(|g| (v, g))).collect();
        let dev = vars.first().map_or(candle_core::Device::Cpu, |v| v.device().clone());
        let stop = if stopping { 1.0f32 } else { 0.0 };
        let mut parts: Vec<Tensor> = present.iter().map(|(_, g)| g.to_dtype(candle_core::DType::F32)?.flatten_all()).collect::<candle_core::Result<_>>()?;
        parts.push(Tensor::new(&[loss, stop], &dev)?);
        let summed = self.collective.all_reduce_tensor(&Tensor::cat(&parts, 0)?)?;
        let mut at = 0;
        for (v, g) in &present {
            let n = g.elem_count();
            let mean = (summed.narrow(0, at, n)?.reshape(g.shape())?.to_dtype(g.dtype())? / world)?;
            grads.insert(v.as_tensor(), mean);
            at += n;
        }
        let tail = summed.narrow(0, at, 2)?.to_vec1::<f32>()?;
        Ok(((tail[0] as f64 / world) as f32, tail[1] > 0.0))
    }

    /// Why training stops at this step: which value is not finite, and what is kept.
    fn non_finite(&self, loss: f32, norm: f64) -> Result<String> {
        let what = if loss.is_finite() { format!("the gradient norm is {norm}") } else { format!("the loss is {loss}") };
        let kept = match checkpoint::list(&self.config.checkpoint_dir)?.pop() {
            Some((_, path)) => format!("the last good checkpoint is {}", path.display()),
            None => "no checkpoint was written yet".to_string(),
        };
        Ok(format!(
            "step {}: {what}; training stopped before the weights changed, and no weights were written ({kept}; a lower --learning-rate or --max-grad-norm may help)",
            self.step + 1
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::unet::UNetConfig;
    use crate::pipeline::schedule::ScheduleConfig;
    use candle_core::{DType, Device};
    use candle_nn::VarBuilder;

    fn examples(n: usize, seed: u64) -> Vec<Example> {
        let mut rng = TrainRng::new(seed);
        let dev = Device::Cpu;
        (0..n)
            .map(|_| Example {
                latent_mean: rng.normal(&[4, 8, 8], &dev).unwrap(),
                latent_std: (rng.normal(&[4, 8, 8], &dev).unwrap().abs().unwrap() * 0.1).unwrap(),
                context: rng.normal(&[5, 12], &dev).unwrap(),
                ids: None,
                attention_mask: None,
            })
            .collect()
    }

    fn unet() -> (VarMap, UNet) {
        let cfg: UNetConfig = crate::models::testing::tiny_unet_config();
        let varmap = VarMap::new();
        let unet = UNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &cfg).unwrap();
        // Same initial weights in every run: overwrite the random init deterministically.
        let mut rng = TrainRng::new(99);
        let mut vars: Vec<_> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, v) in vars {
            v.set(&(rng.normal(v.dims(), &Device::Cpu).unwrap() * 0.2).unwrap()).unwrap();
        }
        (varmap, unet)
    }

    fn config(dir: &std::path::Path) -> TrainConfig {
        TrainConfig {
            max_train_steps: 6,
            train_batch_size: 1,
            gradient_accumulation_steps: 2,
            learning_rate: 1e-3,
            lr_scheduler: LrSchedule::Cosine,
            lr_warmup_steps: 2,
            max_grad_norm: 1.0,
            adam: AdamWParams::default(),
            use_8bit_adam: false,
            loss: LossConfig { with_prior_preservation: true, prior_loss_weight: 1.0, snr_gamma: Some(5.0) },
            noise_offset: 0.05,
            checkpointing_steps: Some(2),
            checkpoints_total_limit: Some(2),
            checkpoint_dir: dir.to_owned(),
            seed: 7,
            compute_dtype: DType::F32,
        }
    }

    fn weights(varmap: &VarMap) -> Vec<(String, Vec<f32>)> {
        let mut w: Vec<_> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        w
    }

    #[test]
    fn resumed_run_equals_uninterrupted_run() {
        let schedule = NoiseSchedule::new(&serde_json::from_str::<ScheduleConfig>("{}").unwrap()).unwrap();
        let (inst, class) = (examples(3, 1), examples(4, 2));

        let dir_a = tempfile::tempdir().unwrap();
        let (varmap_a, unet_a) = unet();
        let mut a = Trainer::new(&unet_a, &varmap_a, &schedule, config(dir_a.path())).unwrap();
        let losses_a = a.run(&inst, &class, None, |_, _, _| {}).unwrap();

        let dir_b = tempfile::tempdir().unwrap();
        let (varmap_b, unet_b) = unet();
        let mut b = Trainer::new(&unet_b, &varmap_b, &schedule, config(dir_b.path())).unwrap();
        let first = b.run(&inst, &class, Some(3), |_, _, _| {}).unwrap(); // "killed" after step 3
        // A fresh process: a new model at the initial weights, resumed from the latest checkpoint (step 2).
        let (varmap_c, unet_c) = unet();
        let mut c = Trainer::new(&unet_c, &varmap_c, &schedule, config(dir_b.path())).unwrap();
        c.resume("latest").unwrap();
        assert_eq!(c.step, 2);
        let rest = c.run(&inst, &class, None, |_, _, _| {}).unwrap();

        assert_eq!(&first[..2], &losses_a[..2]);
        assert_eq!(rest, losses_a[2..].to_vec(), "the resumed loss trajectory must match");
        assert_eq!(weights(&varmap_c), weights(&varmap_a), "and so must the final weights");
        let kept: Vec<usize> = checkpoint::list(dir_b.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(kept, vec![4, 6], "checkpoints_total_limit keeps the newest two");
    }

    fn max_rel_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
        let (mut diff, mut scale) = (0f64, 0f64);
        for ((ka, va), (kb, vb)) in a.iter().zip(b) {
            assert_eq!(ka, kb);
            for (x, y) in va.iter().zip(vb) {
                diff = diff.max((x - y).abs() as f64);
                scale = scale.max(x.abs() as f64);
            }
        }
        diff / scale
    }

    #[test]
    fn two_ranks_of_batch_one_equal_one_rank_of_batch_two_and_resume_on_either() {
        let schedule = NoiseSchedule::new(&serde_json::from_str::<ScheduleConfig>("{}").unwrap()).unwrap();
        let (inst, class) = (examples(3, 1), examples(4, 2));
        let cfg = |dir: &std::path::Path, batch: usize| TrainConfig { train_batch_size: batch, ..config(dir) };
        let dir_one = tempfile::tempdir().unwrap();
        let (varmap_one, unet_one) = unet();
        let mut one = Trainer::new(&unet_one, &varmap_one, &schedule, cfg(dir_one.path(), 2)).unwrap();
        let losses_one = one.run(&inst, &class, None, |_, _, _| {}).unwrap();

        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let ranks = crate::scale::collective::in_process_group(2);
        let results: Vec<(Vec<f32>, Vec<(String, Vec<f32>)>)> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .zip(&dirs)
                .map(|(rank, dir)| {
                    let (schedule, inst, class) = (&schedule, &inst, &class);
                    s.spawn(move || {
                        let (varmap, unet) = unet();
                        let mut t = Trainer::new(&unet, &varmap, schedule, cfg(dir.path(), 1)).unwrap();
                        t.collective = std::sync::Arc::new(rank);
                        let losses = t.run(inst, class, None, |_, _, _| {}).unwrap();
                        (losses, weights(&varmap))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results[0].1, results[1].1, "every rank holds the same weights");
        let rel = max_rel_diff(&results[0].1, &weights(&varmap_one));
        assert!(rel < 1e-5, "2 ranks x batch 1 vs 1 rank x batch 2: max rel diff {rel}");
        for (a, b) in results[0].0.iter().zip(&losses_one) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "losses {:?} vs {losses_one:?}", results[0].0);
        }
        assert_eq!(checkpoint::list(dirs[0].path()).unwrap().len(), 2, "rank 0 writes the checkpoints");
        assert!(std::fs::read_dir(dirs[1].path()).unwrap().next().is_none(), "rank 1 writes nothing");

        // The 2-rank checkpoint of step 4, resumed by one rank with the same global batch.
        let (varmap_r, unet_r) = unet();
        let mut resumed = Trainer::new(&unet_r, &varmap_r, &schedule, cfg(dirs[0].path(), 2)).unwrap();
        resumed.resume(dirs[0].path().join("checkpoint-4").to_str().unwrap()).unwrap();
        let rest = resumed.run(&inst, &class, None, |_, _, _| {}).unwrap();
        assert_eq!(rest.len(), 2);
        let rel = max_rel_diff(&weights(&varmap_r), &weights(&varmap_one));
        assert!(rel < 1e-5, "resumed on another rank count: max rel diff {rel}");
    }

    #[test]
    fn a_stop_request_ends_the_step_with_a_checkpoint_that_resumes_exactly() {
        let schedule = NoiseSchedule::new(&serde_json::from_str::<ScheduleConfig>("{}").unwrap()).unwrap();
        let (inst, class) = (examples(3, 1), examples(4, 2));
        let cfg = |dir: &std::path::Path| TrainConfig { checkpointing_steps: Some(100), ..config(dir) };
        let dir_a = tempfile::tempdir().unwrap();
        let (varmap_a, unet_a) = unet();
        Trainer::new(&unet_a, &varmap_a, &schedule, cfg(dir_a.path())).unwrap().run(&inst, &class, None, |_, _, _| {}).unwrap();

        let dir_b = tempfile::tempdir().unwrap();
        let (varmap_b, unet_b) = unet();
        let mut b = Trainer::new(&unet_b, &varmap_b, &schedule, cfg(dir_b.path())).unwrap();
        let stop = b.stop.clone();
        let err = b.run(&inst, &class, None, |step, _, _| if step == 3 { stop.request(15) }).unwrap_err();
        let i = err.downcast_ref::<Interrupted>().expect("a stop is reported as Interrupted");
        assert_eq!((i.signal, i.step, i.checkpoint.as_deref()), (15, 3, Some(dir_b.path().join("checkpoint-3").as_path())));
        let (varmap_c, unet_c) = unet();
        let mut c = Trainer::new(&unet_c, &varmap_c, &schedule, cfg(dir_b.path())).unwrap();
        c.resume("latest").unwrap();
        assert_eq!(c.step, 3);
        c.run(&inst, &class, None, |_, _, _| {}).unwrap();
        assert_eq!(weights(&varmap_c), weights(&varmap_a), "interrupted + resumed = uninterrupted");
    }

    #[test]
    fn a_non_finite_loss_stops_before_the_weights_change_and_keeps_the_checkpoint() {
        let schedule = NoiseSchedule::new(&serde_json::from_str::<ScheduleConfig>("{}").unwrap()).unwrap();
        let (inst, class) = (examples(3, 1), examples(4, 2));
        let dir = tempfile::tempdir().unwrap();
        let (varmap, unet) = unet();
        let mut t = Trainer::new(&unet, &varmap, &schedule, config(dir.path())).unwrap();
        t.run(&inst, &class, Some(2), |_, _, _| {}).unwrap();
        let good = weights(&varmap);
        // A corrupted latent: every instance example now holds a NaN.
        let poisoned: Vec<Example> = inst
            .iter()
            .map(|e| Example { latent_mean: e.latent_mean.affine(1.0, f64::NAN).unwrap(), ..e.clone() })
            .collect();
        let err = t.run(&poisoned, &class, None, |_, _, _| {}).unwrap_err().to_string();
        assert!(err.starts_with("step 3: the loss is NaN") && err.contains("checkpoint-2"), "{err}");
        assert_eq!(weights(&varmap), good, "no update from a NaN step");
        assert_eq!(t.step, 2);
        let kept: Vec<usize> = checkpoint::list(dir.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(kept, vec![2]);
    }

    #[test]
    fn an_unfinished_checkpoint_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".checkpoint-8.tmp")).unwrap();
        std::fs::create_dir_all(dir.path().join("checkpoint-9")).unwrap(); // no state.json: killed mid-save
        assert!(checkpoint::list(dir.path()).unwrap().is_empty());
        assert!(checkpoint::load(dir.path(), "latest").is_err());
    }

    #[test]
    fn fp16_training_scales_the_loss_and_still_updates() {
        let schedule = NoiseSchedule::new(&serde_json::from_str::<ScheduleConfig>("{}").unwrap()).unwrap();
        let (inst, class) = (examples(3, 1), examples(4, 2));
        let dir = tempfile::tempdir().unwrap();
        let (varmap, unet) = unet();
        let before = weights(&varmap);
        let cfg = TrainConfig { compute_dtype: DType::F16, checkpointing_steps: None, ..config(dir.path()) };
        let mut t = Trainer::new(&unet, &varmap, &schedule, cfg).unwrap();
        let losses = t.run(&inst, &class, None, |_, _, _| {}).unwrap();
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        let scaler = t.scaler.clone().expect("f16 compute gets a loss scaler");
        // Each overflow halves the scale from 65536; the steps that were not skipped moved the weights.
        assert_eq!(scaler.scale, 65536.0 / 2f64.powi(t.skipped_steps as i32));
        assert!(t.skipped_steps < 6, "every step overflowed");
        assert_ne!(weights(&varmap), before);
    }
}
