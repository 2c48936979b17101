//! Streams a safetensors file: the header is written from the tensors' shapes first, then each
//! tensor's bytes as it is produced, so only one tensor is in memory at a time.
//! (The safetensors crate's writer takes infallible `View`s; conversion reads can fail, so the
//! streaming writer is done here, and its output is checked by reading it back with the crate.)

use crate::tensor::{DType, RawTensor};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

/// A tensor to be written: its key, dtype and shape (its data comes later, in this order).
#[derive(Clone, Debug)]
pub struct PendingTensor {
    pub key: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl PendingTensor {
    fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

pub struct StWriter {
    path: std::path::PathBuf,
    out: BufWriter<std::fs::File>,
    pending: std::vec::IntoIter<PendingTensor>,
    /// Bytes handed to `out`, and how far the disk has been asked to write back.
    put: u64,
    kicked: u64,
    /// Bytes the tensor begun last still lacks.
    owed: usize,
    streamer: crate::output::Streamer,
}

/// Written bytes are streamed to disk (see [`crate::output::Streamer`]) this many at a time.
const KICK_EVERY: u64 = 64 << 20;

impl StWriter {
    /// Writes the header for `tensors` (data order = this order) with metadata `{"format": "pt"}`.
    pub fn create(path: &Path, tensors: Vec<PendingTensor>) -> Result<StWriter> {
        StWriter::create_with_metadata(path, tensors, &BTreeMap::new())
    }

    /// As [`StWriter::create`], with `metadata` added to `{"format": "pt"}` (a `format` entry
    /// in it replaces that one).
    pub fn create_with_metadata(path: &Path, tensors: Vec<PendingTensor>, metadata: &BTreeMap<String, String>) -> Result<StWriter> {
        let mut meta = Map::new();
        meta.insert("format".into(), json!("pt"));
        meta.extend(metadata.iter().map(|(k, v)| (k.clone(), json!(v))));
        let mut header = Map::new();
        header.insert("__metadata__".into(), Value::Object(meta));
        let mut offset = 0usize;
        for t in &tensors {
            let len = t.byte_len();
            header.insert(t.key.clone(), json!({"dtype": t.dtype.safetensors_name(), "shape": t.shape, "data_offsets": [offset, offset + len]}));
            offset += len;
        }
        let mut text = serde_json::to_string(&Value::Object(header))?.into_bytes();
        while text.len() % 8 != 0 {
            text.push(b' '); // the format pads the header with spaces to 8-byte alignment
        }
        let file = std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
        crate::output::preallocate(&file, 8 + text.len() as u64 + offset as u64).with_context(|| format!("{}: cannot write", path.display()))?;
        let mut w = StWriter { path: path.to_owned(), out: BufWriter::with_capacity(8 << 20, file), pending: tensors.into_iter(), put: 0, kicked: 0, owed: 0, streamer: Default::default() };
        let header_len = (text.len() as u64).to_le_bytes();
        w.put(&header_len)?;
        w.put(&text)?;
        Ok(w)
    }

    /// Writes the next tensor's data; it must match the next announced key, dtype and shape.
    pub fn write_next(&mut self, key: &str, tensor: &RawTensor) -> Result<()> {
        self.write_next_bytes(key, tensor.dtype, &tensor.shape, &tensor.data)
    }

    /// As [`StWriter::write_next`], from borrowed parts.
    pub fn write_next_bytes(&mut self, key: &str, dtype: DType, shape: &[usize], data: &[u8]) -> Result<()> {
        self.begin_next(key, dtype, shape)?;
        self.write_part(key, data)
    }

    /// Starts the next tensor, whose bytes then come in order through [`StWriter::write_part`].
    pub fn begin_next(&mut self, key: &str, dtype: DType, shape: &[usize]) -> Result<()> {
        ensure!(self.owed == 0, "tensor `{key}` began before the previous one was complete");
        let expected = self.pending.next().with_context(|| format!("tensor `{key}` was not announced"))?;
        ensure!(
            expected.key == key && expected.dtype == dtype && expected.shape == shape,
            "tensor `{key}` ({} {:?}) does not match the header entry `{}` ({} {:?})",
            dtype,
            shape,
            expected.key,
            expected.dtype,
            expected.shape
        );
        self.owed = expected.byte_len();
        Ok(())
    }

    /// The next bytes of the tensor begun last.
    pub fn write_part(&mut self, key: &str, data: &[u8]) -> Result<()> {
        ensure!(data.len() <= self.owed, "tensor `{key}`: {} bytes more than its shape holds", data.len() - self.owed);
        self.owed -= data.len();
        self.put(data)
    }

    pub fn finish(mut self) -> Result<()> {
        ensure!(self.pending.next().is_none() && self.owed == 0, "not every announced tensor was written");
        let len = self.out.get_ref().metadata().map_or(0, |m| m.len() as usize);
        let flushed = crate::convert::phases::time(crate::convert::phases::Phase::Write, 0, || self.out.flush())
            .and_then(|()| crate::convert::phases::time(crate::convert::phases::Phase::Sync, len, || self.out.get_ref().sync_all()));
        let path = &self.path;
        flushed.with_context(|| format!("{}: cannot write", path.display()))
    }

    /// Writes bytes; a failure (a full disk, say) names the file.
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).with_context(|| format!("{}: cannot write", self.path.display()))?;
        self.put += bytes.len() as u64;
        let on_disk_side = self.put - self.out.buffer().len() as u64;
        if on_disk_side >= self.kicked + KICK_EVERY {
            self.streamer.written(self.out.get_ref(), self.kicked, on_disk_side - self.kicked);
            self.kicked = on_disk_side;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusers::st_read::StFile;

    /// Two tensors (f32 and f16) and a writer that announced them in that order.
    fn announced(path: &Path) -> (RawTensor, RawTensor, StWriter) {
        let a = RawTensor { dtype: DType::F32, shape: vec![2, 3], data: (0..24).collect() };
        let b = RawTensor { dtype: DType::F16, shape: vec![3], data: (0..6).collect() };
        let pending = [("a.weight", &a), ("b", &b)]
            .iter()
            .map(|(k, t)| PendingTensor { key: k.to_string(), dtype: t.dtype, shape: t.shape.clone() })
            .collect();
        let w = StWriter::create(path, pending).unwrap();
        (a, b, w)
    }

    #[test]
    fn out_of_order_writes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, b, mut w) = announced(&dir.path().join("x.safetensors"));
        let err = w.write_next("b", &b).unwrap_err().to_string();
        assert!(err.contains("does not match the header entry `a.weight`"), "{err}");
    }

    #[test]
    fn the_whole_file_is_reserved_when_created() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.safetensors");
        let pending = vec![PendingTensor { key: "w".into(), dtype: DType::F32, shape: vec![1 << 20] }];
        let _w = StWriter::create(&path, pending).unwrap();
        // 4 MiB of data announced, nothing written yet: the blocks are there already.
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.blocks() * 512 >= 4 << 20, "{} bytes reserved", meta.blocks() * 512);
    }

    #[test]
    fn a_full_disk_names_the_file() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        let t = RawTensor { dtype: DType::F32, shape: vec![1 << 20], data: vec![0; 4 << 20] };
        let pending = vec![PendingTensor { key: "w".into(), dtype: DType::F32, shape: t.shape.clone() }];
        let mut w = StWriter::create(Path::new("/dev/full"), pending).unwrap(); // the header is still buffered
        let err = w.write_next("w", &t).and_then(|()| w.finish()).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.starts_with("/dev/full: cannot write: No space left on device"), "{text}");
    }

    #[test]
    fn extra_metadata_for_lora_files_is_kept_beside_the_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let t = RawTensor { dtype: DType::F32, shape: vec![], data: vec![0; 4] };
        let meta = BTreeMap::from([("ss_network_dim".to_string(), "4".to_string())]);
        let mut w = StWriter::create_with_metadata(&path, vec![PendingTensor { key: "a".into(), dtype: DType::F32, shape: vec![] }], &meta).unwrap();
        w.write_next("a", &t).unwrap();
        w.finish().unwrap();
        let got = StFile::open(&path).unwrap().metadata();
        assert_eq!(got, BTreeMap::from([("format".to_string(), "pt".to_string()), ("ss_network_dim".to_string(), "4".to_string())]));
    }

    #[test]
    fn a_tensor_in_parts_must_add_up_to_its_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let (a, b, mut w) = announced(&path);
        w.begin_next("a.weight", a.dtype, &a.shape).unwrap();
        w.write_part("a.weight", &a.data[..10]).unwrap();
        let early = w.begin_next("b", b.dtype, &b.shape).unwrap_err().to_string();
        assert!(early.contains("began before the previous one was complete"), "{early}");
        let over = w.write_part("a.weight", &a.data).unwrap_err().to_string();
        assert!(over.contains("10 bytes more than its shape holds"), "{over}");
        w.write_part("a.weight", &a.data[10..]).unwrap();
        w.write_next("b", &b).unwrap();
        w.finish().unwrap();
        assert_eq!(StFile::open(&path).unwrap().read("a.weight").unwrap(), a);
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let (a, b, mut w) = announced(&path);
        w.write_next("a.weight", &a).unwrap();
        w.write_next("b", &b).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b").unwrap().data(), &b.data[..]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let f = StFile::open(&path).unwrap();
        assert_eq!(f.read("a.weight").unwrap(), a);
        assert_eq!(f.keys(), vec!["a.weight", "b"]);
    }
}
