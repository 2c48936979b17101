//! TensorBoard event files, as `--report_to tensorboard` writes them through accelerate and
//! torch's `SummaryWriter`: `<output>/<logging_dir>/dreambooth/events.out.tfevents.<time>.<host>.<pid>.<n>`,
//! scalars `loss` and `lr` per step, and validation images as one grid per round (`add_images`
//! with NHWC data, up to 8 per row, no padding).
//!
//! The file is TFRecord framing (length, masked CRC-32C of the length, an `Event` protobuf, its
//! masked CRC) around the messages of TensorFlow's `event.proto` and `summary.proto`; each record
//! is flushed when written, so a killed run keeps every event logged before it.

use anyhow::{Context, Result};
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "4")]
    pub image: Option<SummaryImage>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryImage {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 3 = RGB.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// TFRecord's checksum: CRC-32C rotated right by 15 bits plus a constant.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord: the framing around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// Reads every event of a file (checking both checksums of each record).
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut events = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let bad = || anyhow::anyhow!("{}: broken record at byte {at}", path.display());
        let head = bytes.get(at..at + 12).ok_or_else(bad)?;
        let len = u64::from_le_bytes(head[..8].try_into().unwrap()) as usize;
        anyhow::ensure!(u32::from_le_bytes(head[8..12].try_into().unwrap()) == masked_crc(&head[..8]), bad());
        let data = bytes.get(at + 12..at + 12 + len).ok_or_else(bad)?;
        let crc = bytes.get(at + 12 + len..at + 16 + len).ok_or_else(bad)?;
        anyhow::ensure!(u32::from_le_bytes(crc.try_into().unwrap()) == masked_crc(data), bad());
        events.push(Event::decode(data).with_context(bad)?);
        at += 16 + len;
    }
    Ok(events)
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").or_else(|_| std::fs::read_to_string("/etc/hostname")).map_or_else(|_| "localhost".into(), |h| h.trim().to_string())
}

/// An open event file.
pub struct EventWriter {
    file: std::fs::File,
    pub path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created), starting with the file-version event.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let wall = now();
        let mut n = 0;
        let path = loop {
            let p = dir.join(format!("events.out.tfevents.{:010}.{}.{}.{n}", wall as u64, hostname(), std::process::id()));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let file = std::fs::OpenOptions::new().create_new(true).append(true).open(&path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut w = EventWriter { file, path };
        w.write(Event { wall_time: wall, step: 0, file_version: Some("brain.Event:2".into()), summary: None })?;
        Ok(w)
    }

    fn write(&mut self, event: Event) -> Result<()> {
        self.file.write_all(&record(&event.encode_to_vec())).and_then(|_| self.file.flush()).with_context(|| format!("{}: cannot write", self.path.display()))
    }

    /// Scalars at `step`, one event holding them all (as accelerate's `log`).
    pub fn scalars(&mut self, step: usize, values: &[(&str, f64)]) -> Result<()> {
        let value = values.iter().map(|(tag, v)| SummaryValue { tag: tag.to_string(), simple_value: Some(*v as f32), image: None }).collect();
        self.write(Event { wall_time: now(), step: step as i64, file_version: None, summary: Some(Summary { value }) })
    }

    /// Images of one size as torch's `add_images(tag, NHWC)`: one grid, up to 8 per row.
    pub fn images(&mut self, step: usize, tag: &str, images: &[image::RgbImage]) -> Result<()> {
        let Some(first) = images.first() else { return Ok(()) };
        let (w, h) = first.dimensions();
        anyhow::ensure!(images.iter().all(|i| i.dimensions() == (w, h)), "TensorBoard images of one round must share their size");
        let cols = images.len().min(8) as u32;
        let rows = images.len().div_ceil(8) as u32;
        let mut grid = image::RgbImage::new(w * cols, h * rows);
        for (i, img) in images.iter().enumerate() {
            image::imageops::replace(&mut grid, img, ((i as u32 % cols) * w) as i64, ((i as u32 / cols) * h) as i64);
        }
        let mut png = Vec::new();
        grid.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        let image = SummaryImage { height: grid.height() as i32, width: grid.width() as i32, colorspace: 3, encoded_image_string: png };
        let value = vec![SummaryValue { tag: tag.into(), simple_value: None, image: Some(image) }];
        self.write(Event { wall_time: now(), step: step as i64, file_version: None, summary: Some(Summary { value }) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_tensorflow_checksums_and_read_back() {
        // TFRecord's masked CRC of the empty string, as TensorFlow computes it.
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(3, &[("loss", 0.25), ("lr", 5e-6)]).unwrap();
        w.images(3, "validation", &[image::RgbImage::new(4, 2), image::RgbImage::new(4, 2), image::RgbImage::new(4, 2)]).unwrap();
        let name = w.path.file_name().unwrap().to_string_lossy().to_string();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let events = read_events(&w.path).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let v = &events[1].summary.as_ref().unwrap().value;
        assert_eq!((events[1].step, v[0].tag.as_str(), v[0].simple_value, v[1].simple_value), (3, "loss", Some(0.25), Some(5e-6)));
        let img = events[2].summary.as_ref().unwrap().value[0].image.clone().unwrap();
        assert_eq!((img.width, img.height, img.colorspace), (12, 2, 3), "three 4x2 images side by side");
        assert!(img.encoded_image_string.starts_with(b"\x89PNG"));
        // A flipped byte is caught by the checksums.
        let mut bytes = std::fs::read(&w.path).unwrap();
        let at = bytes.len() - 10;
        bytes[at] ^= 1;
        std::fs::write(&w.path, bytes).unwrap();
        assert!(read_events(&w.path).unwrap_err().to_string().contains("broken record"));
    }
}
