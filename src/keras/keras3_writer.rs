//! Writes Keras 3 `.weights.h5` files: each variable a dataset `<layer path>/vars/<n>`, found by
//! Keras' loader by that path alone (`H5IOStore.get`); or, above a shard size, Keras' sharded
//! form (`ShardedH5IOStore`): `<name>.weights.json` mapping each `/<layer path>/vars` group to the
//! shard(s) `<name>_00000.weights.h5`, … that hold it.

use crate::tensor::{DType, RawTensor};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// libhdf5 lays out the file (groups, attributes, each dataset's storage, allocated at once and
/// never filled); the tensors' bytes are written at their datasets' places through `data`,
/// streamed to disk as they go ([`crate::output::Streamer`]), and the file is synced before
/// [`Keras3Writer::finish`] returns.
pub struct Keras3Writer {
    file: hdf5::File,
    data: Placed,
    shards: Option<Shards>,
}

/// The current file opened for writing tensor bytes at their places.
struct Placed {
    path: PathBuf,
    file: std::fs::File,
    streamer: crate::output::Streamer,
}

impl Placed {
    fn open(path: &Path) -> Result<Placed> {
        let file = std::fs::OpenOptions::new().write(true).open(path).with_context(|| format!("{}: cannot open for writing", path.display()))?;
        Ok(Placed { path: path.to_owned(), file, streamer: Default::default() })
    }

    fn write_at(&mut self, bytes: &[u8], offset: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(bytes, offset).with_context(|| format!("{}: cannot write", self.path.display()))?;
        self.streamer.written(&self.file, offset, bytes.len() as u64);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_all().with_context(|| format!("{}: cannot sync", self.path.display()))
    }
}

/// The sharded form's state: where the map goes, the shard size, what is where.
struct Shards {
    map: PathBuf,
    base: String,
    max_bytes: f64,
    names: Vec<String>,
    current_bytes: f64,
    total_bytes: f64,
    weight_map: BTreeMap<String, Vec<String>>,
}

/// Keras' shard file name: `model.weights.json` -> `model_00000.weights.h5`.
pub fn shard_name(map: &Path, index: usize) -> String {
    let stem = map.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let base = stem.strip_suffix(".json").unwrap_or(&stem).replace(".weights", "");
    format!("{base}_{index:05}.weights.h5")
}

fn create_h5(path: &Path) -> Result<hdf5::File> {
    let file = hdf5::File::create(path).map_err(|e| anyhow::anyhow!("{}: cannot create HDF5 file ({e})", path.display()))?;
    // The root groups Keras writes.
    file.create_group("layers")?;
    file.create_group("vars")?;
    Ok(file)
}

impl Keras3Writer {
    /// Creates the file with the root groups Keras writes (`layers`, `vars`).
    pub fn create(path: &Path) -> Result<Keras3Writer> {
        let file = create_h5(path)?;
        Ok(Keras3Writer { file, data: Placed::open(path)?, shards: None })
    }

    /// Keras' sharded form: the map at `map` (`<name>.weights.json`), shards of at most
    /// `max_bytes` beside it (a variable larger than that gets a shard of its own; Keras refuses
    /// one, dreambridge cannot split it either: it is written whole).
    pub fn create_sharded(map: &Path, max_bytes: f64) -> Result<Keras3Writer> {
        let name = shard_name(map, 0);
        let path = map.with_file_name(&name);
        let file = create_h5(&path)?;
        let base = shard_name(map, 0).trim_end_matches("_00000.weights.h5").to_string();
        let shards = Shards { map: map.to_owned(), base, max_bytes, names: vec![name], current_bytes: 0.0, total_bytes: 0.0, weight_map: BTreeMap::new() };
        Ok(Keras3Writer { file, data: Placed::open(&path)?, shards: Some(shards) })
    }

    /// The files written so far (the map last, once finished).
    pub fn files(&self) -> Vec<PathBuf> {
        match &self.shards {
            Some(s) => s.names.iter().map(|n| s.map.with_file_name(n)).chain([s.map.clone()]).collect(),
            None => Vec::new(),
        }
    }

    /// The group at `path`, created with its parents where missing.
    fn group(&self, path: &str) -> Result<hdf5::Group> {
        let mut at = String::new();
        let mut group = self.file.group("/")?;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            group = if self.file.link_exists(&at) { self.file.group(&at)? } else { group.create_group(part).with_context(|| format!("group `{at}`: cannot create"))? };
        }
        Ok(group)
    }

    /// Sharded: counts `bytes` into the current shard, starting the next one first where it
    /// would pass the shard size (as `ShardedH5IOStore.__setitem__`), and records the group.
    fn place(&mut self, dir: &str, bytes: f64) -> Result<()> {
        let Some(s) = &mut self.shards else { return Ok(()) };
        s.total_bytes += bytes;
        s.current_bytes += bytes;
        if s.current_bytes > s.max_bytes && s.current_bytes > bytes {
            let name = format!("{}_{:05}.weights.h5", s.base, s.names.len());
            let path = s.map.with_file_name(&name);
            let next = create_h5(&path)?;
            let done = std::mem::replace(&mut self.file, next);
            done.close()?;
            let done = std::mem::replace(&mut self.data, Placed::open(&path)?);
            done.sync()?;
            s.names.push(name);
            s.current_bytes = bytes;
        }
        let shard = s.names.last().expect("a shard").clone();
        let owners = s.weight_map.entry(format!("/{dir}")).or_default();
        if !owners.contains(&shard) {
            owners.push(shard);
        }
        Ok(())
    }

    /// Writes one variable at `path` (`layers/.../vars/0`) in its own type; bfloat16 as Keras 3
    /// stores it (a 2-byte opaque type with the attribute `dtype` = "bfloat16").
    pub fn write(&mut self, path: &str, tensor: RawTensor) -> Result<()> {
        self.write_bytes(path, tensor.dtype, &tensor.shape, &tensor.data)
    }

    /// [`Keras3Writer::write`] from bytes where they lie (little-endian elements of `dtype`).
    pub fn write_bytes(&mut self, path: &str, dtype: DType, shape: &[usize], data: &[u8]) -> Result<()> {
        let (dir, name) = path.rsplit_once('/').with_context(|| format!("`{path}` has no group"))?;
        self.place(dir, data.len() as f64)?;
        let g = self.group(dir)?;
        let what = |e: &dyn std::fmt::Display| anyhow::anyhow!("tensor `{path}`: cannot write ({e})");
        let offset = match dtype {
            DType::BF16 => super::h5ffi::create_opaque_placed(&g, name, shape, Some("bfloat16")).map_err(|e| what(&e))?,
            DType::F32 => placed(g.new_dataset::<f32>(), shape, name).map_err(|e| what(&e))?,
            DType::F16 => placed(g.new_dataset::<half::f16>(), shape, name).map_err(|e| what(&e))?,
        };
        match offset {
            Some(offset) => self.data.write_at(data, offset),
            None if data.is_empty() => Ok(()),
            None => Err(what(&"libhdf5 gave its storage no place in the file")),
        }
    }

    pub fn finish(self) -> Result<()> {
        self.file.flush()?;
        self.file.close()?;
        self.data.sync()?;
        if let Some(s) = self.shards {
            // As Keras writes it: a group in one shard maps to its name, in several to the list.
            let weight_map: serde_json::Map<String, Value> =
                s.weight_map.into_iter().map(|(k, v)| (k, if v.len() == 1 { json!(v[0]) } else { json!(v) })).collect();
            let map = json!({"metadata": {"total_size": s.total_bytes}, "weight_map": weight_map});
            std::fs::write(&s.map, serde_json::to_string_pretty(&map)?).with_context(|| format!("{}: cannot write", s.map.display()))?;
            Placed::open(&s.map)?.sync()?;
        }
        Ok(())
    }
}

/// A contiguous dataset whose storage is allocated at once and never filled; where its bytes go.
fn placed(builder: hdf5::DatasetBuilderEmpty, shape: &[usize], name: &str) -> hdf5::Result<Option<u64>> {
    use hdf5::dataset::{AllocTime, FillTime};
    Ok(builder.shape(shape.to_vec()).alloc_time(Some(AllocTime::Early)).fill_time(FillTime::Never).create(name)?.offset())
}
