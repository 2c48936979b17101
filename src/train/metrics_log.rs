//! `logs/metrics.jsonl` of a training run: one JSON object per step (loss, learning rate, steps
//! per second) and per validation round (DINO, CLIP-I, CLIP-T of its images), appended and flushed
//! as they come, so a killed run keeps its log; a resumed run drops the rows past its checkpoint.
//! `logs/metrics.png` plots them: loss (blue, scaled to its own range) and the scores on [0, 1]
//! (DINO red, CLIP-I green, CLIP-T orange), steps left to right.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct MetricsLog {
    pub path: PathBuf,
    file: std::fs::File,
    rows: Vec<Value>,
    last: Option<(Instant, usize)>,
}

impl MetricsLog {
    /// Opens `<output>/logs/metrics.jsonl`, keeping the rows up to `resumed_at` (0: a new run).
    pub fn open(output_dir: &Path, resumed_at: usize) -> Result<MetricsLog> {
        let dir = output_dir.join("logs");
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let path = dir.join("metrics.jsonl");
        let kept: Vec<Value> = match (resumed_at, std::fs::read_to_string(&path)) {
            (0, _) | (_, Err(_)) => Vec::new(),
            (k, Ok(text)) => text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["step"].as_u64().is_some_and(|s| s as usize <= k))
                .collect(),
        };
        let text: String = kept.iter().map(|v| format!("{v}\n")).collect();
        crate::output::atomic_file(&path, |temp| Ok(std::fs::write(temp, &text)?))?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(MetricsLog { path, file, rows: kept, last: None })
    }

    fn append(&mut self, row: Value) -> Result<()> {
        writeln!(self.file, "{row}").and_then(|_| self.file.flush()).with_context(|| format!("{}: cannot write", self.path.display()))?;
        self.rows.push(row);
        Ok(())
    }

    /// A training step's loss and learning rate, with steps per second since the previous one.
    pub fn step(&mut self, step: usize, loss: f32, lr: f64) -> Result<()> {
        let now = Instant::now();
        let rate = self.last.map(|(t, s)| (step - s) as f64 / now.duration_since(t).as_secs_f64().max(1e-9));
        self.last = Some((now, step));
        self.append(json!({"step": step, "loss": loss, "lr": lr, "it_per_s": rate}))
    }

    /// A validation round's scores (the `metrics` object of an eval report) and how they were made.
    pub fn scores(&mut self, step: usize, metrics: &Value, clip_t_prompt: &str) -> Result<()> {
        self.append(json!({"step": step, "dino": metrics["dino"], "clip_i": metrics["clip_i"], "clip_t": metrics["clip_t"], "clip_t_prompt": clip_t_prompt}))
    }

    /// Draws `logs/metrics.png` (see the module docs).
    pub fn plot(&self) -> Result<PathBuf> {
        let (w, h, pad) = (640u32, 360u32, 20u32);
        let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
        let grey = image::Rgb([160, 160, 160]);
        line(&mut img, (pad, h - pad), (w - pad, h - pad), grey);
        line(&mut img, (pad, pad), (pad, h - pad), grey);
        let last_step = self.rows.iter().filter_map(|r| r["step"].as_f64()).fold(1.0, f64::max);
        let x = |s: f64| pad + ((w - 2 * pad) as f64 * s / last_step) as u32;
        let y = |v: f64| h - pad - ((h - 2 * pad) as f64 * v.clamp(0.0, 1.0)) as u32;
        let series = |key: &str| -> Vec<(f64, f64)> { self.rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?))).collect() };
        let loss = series("loss");
        let (lo, hi) = loss.iter().fold((f64::MAX, f64::MIN), |(a, b), (_, v)| (a.min(*v), b.max(*v)));
        let span = if hi > lo { hi - lo } else { 1.0 };
        let scaled: Vec<(f64, f64)> = loss.iter().map(|(s, v)| (*s, (v - lo) / span)).collect();
        for (points, colour) in [
            (scaled, [40, 90, 200]),
            (series("dino"), [200, 40, 40]),
            (series("clip_i"), [40, 160, 60]),
            (series("clip_t"), [230, 140, 20]),
        ] {
            for pair in points.windows(2) {
                line(&mut img, (x(pair[0].0), y(pair[0].1)), (x(pair[1].0), y(pair[1].1)), image::Rgb(colour));
            }
            if points.len() == 1 {
                let (px, py) = (x(points[0].0), y(points[0].1));
                line(&mut img, (px.saturating_sub(2), py), (px + 2, py), image::Rgb(colour));
            }
        }
        let path = self.path.with_extension("png");
        crate::output::atomic_file(&path, |temp| Ok(img.save_with_format(temp, image::ImageFormat::Png)?))?;
        Ok(path)
    }
}

/// A straight line (Bresenham), clipped to the image.
fn line(img: &mut image::RgbImage, from: (u32, u32), to: (u32, u32), colour: image::Rgb<u8>) {
    let (mut x0, mut y0, x1, y1) = (from.0 as i64, from.1 as i64, to.0 as i64, to.1 as i64);
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        if x0 >= 0 && y0 >= 0 && (x0 as u32) < img.width() && (y0 as u32) < img.height() {
            img.put_pixel(x0 as u32, y0 as u32, colour);
        }
        if x0 == x1 && y0 == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x0 += sx;
        }
        if e2 <= dx {
            err += dx;
            y0 += sy;
        }
    }
}

/// The CLIP-T prompt of a validation prompt: the instance prompt's identifier (its words that the
/// class prompt lacks, e.g. `sks`) removed, as published DreamBooth evaluations score CLIP-T.
pub fn without_identifier(prompt: &str, instance_prompt: &str, class_prompt: Option<&str>) -> String {
    let Some(class) = class_prompt else { return prompt.to_string() };
    let class_words: std::collections::BTreeSet<&str> = class.split_whitespace().collect();
    let identifier: Vec<&str> = instance_prompt.split_whitespace().filter(|w| !class_words.contains(w)).collect();
    prompt.split_whitespace().filter(|w| !identifier.contains(w)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identifier_leaves_the_clip_t_prompt() {
        assert_eq!(without_identifier("a photo of sks dog in a bucket", "a photo of sks dog", Some("a photo of dog")), "a photo of dog in a bucket");
        assert_eq!(without_identifier("sks dog", "sks dog", None), "sks dog");
    }

    #[test]
    fn a_resumed_log_keeps_its_rows_up_to_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), 0).unwrap();
        for s in 1..=4 {
            log.step(s, 1.0 / s as f32, 1e-4).unwrap();
        }
        log.scores(4, &json!({"dino": 0.5, "clip_i": 0.6, "clip_t": 0.2}), "a dog").unwrap();
        assert!(log.plot().unwrap().is_file());
        drop(log);
        let log = MetricsLog::open(dir.path(), 2).unwrap();
        assert_eq!(log.rows.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2]);
        let text = std::fs::read_to_string(dir.path().join("logs/metrics.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 2);
    }
}
