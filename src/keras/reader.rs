//! Opens KerasCV weight files: Keras-2 legacy `.h5` (`save_weights`, or `model.save` with its
//! `model_weights` group), Keras-3 `.weights.h5`, sharded Keras-3 weights (`.weights.json` + its
//! shards, see [`super::sharded`]) and `.keras` archives, TensorFlow checkpoints (`ckpt.index` +
//! data shards) and SavedModel folders (`saved_model.pb` + `variables/`). Legacy files are read by
//! the order of `layer_names` / `weight_names`, never by the (session-dependent) names themselves;
//! TF checkpoints by their object graph's layer order. Elements are float32, float16, or bfloat16
//! as Keras 3 stores it (a 2-byte opaque type with a `dtype` = "bfloat16" attribute).

use super::h5ffi;
use super::sharded::Sharded;
use super::strings::{read_string, read_string_list};
use super::tf_bundle::TfBundle;
use crate::tensor::{DType, RawTensor};
use anyhow::{bail, ensure, Context, Result};
use hdf5::types::{FloatSize, TypeDescriptor};
use std::io::Read;
use std::path::{Path, PathBuf};

const HDF5_SIGNATURE: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KerasFormat {
    /// Keras 2 `save_weights("x.h5")`: ordered `layer_names` / `weight_names` attributes.
    Legacy,
    /// Keras 3 `save_weights("x.weights.h5")`: `layers/<key>/.../vars/<n>` paths (also inside
    /// a `.keras` archive, or spread over the shards of a `.weights.json`).
    Keras3,
    /// TensorFlow checkpoint (`save_weights("ckpt")`, `ModelCheckpoint` without `.h5`).
    TfCheckpoint,
    /// TensorFlow SavedModel (`model.save(dir)`, `push_to_hub_keras`): its `variables/` bundle.
    SavedModel,
}

impl KerasFormat {
    /// Read by weighted-layer order (legacy `.h5`, TF checkpoints, SavedModels).
    pub fn ordered(self) -> bool {
        self != KerasFormat::Keras3
    }
}

/// Where the tensors are.
enum Backend {
    /// An HDF5 file; for a `.keras` archive, its `model.weights.h5` extracted to a temp file
    /// (kept until the file is dropped).
    Hdf5(H5, #[allow(dead_code)] Option<tempfile::TempPath>),
    /// Keras 3 sharded weights: the map and every shard.
    Sharded(Sharded),
    Bundle(TfBundle),
}

/// An open HDF5 file and, where it could be made, a read-only map of it (contiguous datasets are
/// read straight from the map; without one, libhdf5 reads).
pub(super) struct H5 {
    pub(super) file: hdf5::File,
    pub(super) map: Option<memmap2::Mmap>,
}

impl H5 {
    pub(super) fn open(path: &Path) -> Result<H5> {
        check_signature(path)?;
        let file = hdf5::File::open(path).map_err(|e| anyhow::anyhow!("cannot open as HDF5 ({e}); is the file truncated?"))?;
        // SAFETY: read-only, and the file is not modified while dreambridge runs.
        let map = std::fs::File::open(path).ok().and_then(|f| unsafe { memmap2::Mmap::map(&f) }.ok());
        Ok(H5 { file, map })
    }
}

/// A weighted layer of a legacy file: group name and dataset paths, in file order.
#[derive(Clone, Debug)]
pub struct KerasLayer {
    pub name: String,
    pub weights: Vec<String>,
}

pub struct KerasFile {
    pub path: PathBuf,
    pub format: KerasFormat,
    /// Weighted layers in `layer_names` order (legacy files only).
    pub layers: Vec<KerasLayer>,
    pub keras_version: Option<String>,
    backend: Backend,
}

/// Shape and dtype of a dataset, without reading it.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl KerasFile {
    /// Opens any of the supported forms, told apart by content and layout (see the module docs).
    pub fn open(path: &Path) -> Result<KerasFile> {
        if let Some((prefix, format)) = bundle_prefix(path)? {
            return Self::open_bundle(path, &prefix, format);
        }
        if path.extension().is_some_and(|e| e == "keras") {
            return Self::open_keras_archive(path);
        }
        if path.extension().is_some_and(|e| e == "json") {
            return Self::open_sharded(path);
        }
        Self::open_hdf5(path, None)
    }

    /// Keras 3 sharded weights: the `.weights.json` map, its shards beside it.
    fn open_sharded(path: &Path) -> Result<KerasFile> {
        let sharded = Sharded::open(path)?;
        Ok(KerasFile { path: path.to_owned(), format: KerasFormat::Keras3, layers: Vec::new(), keras_version: None, backend: Backend::Sharded(sharded) })
    }

    fn open_bundle(path: &Path, prefix: &Path, format: KerasFormat) -> Result<KerasFile> {
        let bundle = TfBundle::open(prefix)?;
        let graph = bundle
            .read_string(super::tf_objects::OBJECT_GRAPH_KEY)
            .with_context(|| format!("{}: no object graph (a TF1-style checkpoint, which is not read)", prefix.display()))?;
        let layers = super::tf_objects::weighted_layers(&graph)?;
        Ok(KerasFile { path: path.to_owned(), format, layers, keras_version: None, backend: Backend::Bundle(bundle) })
    }

    /// A Keras 3 `.keras` archive: a zip holding `config.json` and `model.weights.h5`.
    fn open_keras_archive(path: &Path) -> Result<KerasFile> {
        let file = std::fs::File::open(path).context("cannot open")?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| anyhow::anyhow!("not a readable .keras archive ({e}; truncated?)"))?;
        let mut weights = zip.by_name("model.weights.h5").map_err(|_| anyhow::anyhow!("a .keras archive without model.weights.h5"))?;
        let mut temp = tempfile::NamedTempFile::new().context("cannot create a temp file for model.weights.h5")?;
        std::io::copy(&mut weights, temp.as_file_mut()).context("cannot extract model.weights.h5 (truncated?)")?;
        let temp = temp.into_temp_path();
        let mut opened = Self::open_hdf5(&temp, None).context("model.weights.h5")?;
        opened.path = path.to_owned();
        if let Backend::Hdf5(h5, _) = opened.backend {
            opened.backend = Backend::Hdf5(h5, Some(temp));
        }
        Ok(opened)
    }

    fn open_hdf5(path: &Path, temp: Option<tempfile::TempPath>) -> Result<KerasFile> {
        let h5 = H5::open(path)?;
        let file = &h5.file;
        let root: hdf5::Group = if read_string_list(file, "layer_names")?.is_none() && file.link_exists("model_weights") {
            file.group("model_weights")? // full-model save: weights live one level down
        } else {
            file.group("/")?
        };
        let keras_version = read_string(&root, "keras_version")?;
        if let Some(names) = read_string_list(&root, "layer_names")? {
            let mut layers = Vec::new();
            for name in names {
                let group = root.group(&name).with_context(|| format!("layer `{name}` is listed in layer_names but missing"))?;
                let weights = read_string_list(&group, "weight_names")?.unwrap_or_default();
                if !weights.is_empty() {
                    let base = root.name();
                    let prefix = if base == "/" { String::new() } else { format!("{}/", base.trim_start_matches('/')) };
                    let weights = weights.iter().map(|w| format!("{prefix}{name}/{w}")).collect();
                    layers.push(KerasLayer { name, weights });
                }
            }
            return Ok(KerasFile { path: path.to_owned(), format: KerasFormat::Legacy, layers, keras_version, backend: Backend::Hdf5(h5, temp) });
        }
        if file.link_exists("layers") {
            return Ok(KerasFile { path: path.to_owned(), format: KerasFormat::Keras3, layers: Vec::new(), keras_version, backend: Backend::Hdf5(h5, temp) });
        }
        bail!("not a Keras weights file: no `layer_names` attribute and no `layers` group")
    }

    /// The dataset at `path` and the HDF5 file holding it (across shards for sharded weights).
    fn dataset(&self, path: &str) -> Result<(&H5, hdf5::Dataset)> {
        let not_found = || format!("tensor `{path}`: not found");
        match &self.backend {
            Backend::Hdf5(h5, _) => Ok((h5, h5.file.dataset(path).with_context(not_found)?)),
            Backend::Sharded(s) => s.dataset(path).with_context(not_found),
            Backend::Bundle(_) => bail!("not an HDF5 file"),
        }
    }

    /// Whether `path` is a dataset or a group of the file (for TF bundles: a tensor).
    pub fn has_dataset(&self, path: &str) -> bool {
        let file = match &self.backend {
            Backend::Hdf5(h5, _) => &h5.file,
            Backend::Sharded(s) => return s.has_path(path),
            Backend::Bundle(b) => return b.entries.contains_key(path),
        };
        // link_exists needs every parent to exist; walk down so a missing parent is just "absent".
        let mut prefix = String::new();
        for part in path.split('/') {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if !file.link_exists(&prefix) {
                return false;
            }
        }
        true
    }

    pub fn info(&self, path: &str) -> Result<DatasetInfo> {
        if let Backend::Bundle(b) = &self.backend {
            let e = b.entries.get(path).with_context(|| format!("tensor `{path}`: not found"))?;
            return Ok(DatasetInfo { dtype: b.dtype(path)?, shape: e.shape.clone() });
        }
        let (_, ds) = self.dataset(path)?;
        Ok(DatasetInfo { dtype: element_dtype(&ds, path)?, shape: ds.shape() })
    }

    /// Reads one dataset as raw little-endian bytes in its own float type (bfloat16: the bytes
    /// as Keras stored them).
    pub fn read(&self, path: &str) -> Result<RawTensor> {
        if let Backend::Bundle(b) = &self.backend {
            return b.read(path);
        }
        let (_, ds) = self.dataset(path)?;
        let dtype = element_dtype(&ds, path)?;
        let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("tensor `{path}`: cannot read data ({e}); is the file truncated?");
        // Native (little-endian) element bytes; libhdf5 converts big-endian files on read.
        let data: Vec<u8> = match dtype {
            DType::F32 => bytemuck::cast_slice(&ds.read_raw::<f32>().map_err(|e| fail(&e))?).to_vec(),
            DType::F16 => bytemuck::cast_slice(&ds.read_raw::<half::f16>().map_err(|e| fail(&e))?).to_vec(),
            // An opaque type: no conversion exists, so libhdf5 reads it in its own type.
            DType::BF16 => h5ffi::read_own_type(&ds, 2).map_err(|e| fail(&e))?,
        };
        Ok(RawTensor { dtype, shape: ds.shape(), data })
    }

    /// Runs `f` on one dataset's little-endian bytes in its own float type. A contiguous,
    /// unfiltered little-endian dataset (or a Keras bfloat16 one, whose opaque type has no byte
    /// order) is passed where it lies in the file's map (no copy; its pages leave the resident set
    /// afterwards); anything else (chunked, compressed, big-endian, TF bundles) goes through
    /// [`KerasFile::read`].
    pub fn with_bytes<R>(&self, path: &str, f: impl FnOnce(DType, &[usize], &[u8]) -> R) -> Result<R> {
        if !matches!(self.backend, Backend::Bundle(_)) {
            let (h5, ds) = self.dataset(path)?;
            if let Some(map) = &h5.map {
                let dtype = element_dtype(&ds, path)?;
                let shape = ds.shape();
                let len = shape.iter().product::<usize>() * dtype.size();
                let little = dtype == DType::BF16 || ds.dtype().is_ok_and(|t| matches!(t.byte_order(), hdf5::datatype::ByteOrder::LittleEndian));
                let plain = ds.layout() == hdf5::dataset::Layout::Contiguous && ds.filters().is_empty() && little;
                if let Some(offset) = ds.offset().filter(|_| plain && len > 0).map(|o| o as usize) {
                    ensure!(offset.checked_add(len).is_some_and(|end| end <= map.len()), "tensor `{path}`: data runs past the end of the file (truncated?)");
                    let out = f(dtype, &shape, &map[offset..offset + len]);
                    // SAFETY: a read-only map, and no reference into the range outlives `f`; dropped
                    // pages are read back from the page cache if touched again.
                    #[cfg(unix)]
                    unsafe {
                        let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len);
                    }
                    return Ok(out);
                }
            }
        }
        let raw = crate::convert::phases::time(crate::convert::phases::Phase::Read, 0, || self.read(path))?;
        Ok(f(raw.dtype, &raw.shape, &raw.data))
    }

    /// Every dataset under `layers/` (Keras 3) with its info, sorted by path.
    pub fn keras3_datasets(&self) -> Result<Vec<(String, DatasetInfo)>> {
        let mut out = Vec::new();
        match &self.backend {
            Backend::Hdf5(h5, _) => collect_datasets(&h5.file.group("layers")?, "layers", &mut out)?,
            Backend::Sharded(s) => out = s.datasets_under("layers")?,
            Backend::Bundle(_) => bail!("not an HDF5 file"),
        }
        out.sort();
        out.into_iter().map(|p| Ok((p.clone(), self.info(&p)?))).collect()
    }
}

/// The bundle prefix and format when `path` names a TF checkpoint (`x.index`, a data shard, the
/// prefix itself, or a folder with a `checkpoint` file) or a SavedModel folder.
fn bundle_prefix(path: &Path) -> Result<Option<(PathBuf, KerasFormat)>> {
    if path.is_dir() {
        if path.join("saved_model.pb").is_file() || path.join("saved_model.pbtxt").is_file() {
            return Ok(Some((path.join("variables/variables"), KerasFormat::SavedModel)));
        }
        let state = path.join("checkpoint");
        if state.is_file() {
            let text = std::fs::read_to_string(&state).with_context(|| format!("{}: cannot read", state.display()))?;
            let latest = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("model_checkpoint_path:"))
                .map(|v| v.trim().trim_matches('"').to_string())
                .with_context(|| format!("{}: no model_checkpoint_path", state.display()))?;
            let prefix = if Path::new(&latest).is_absolute() { PathBuf::from(latest) } else { path.join(latest) };
            return Ok(Some((prefix, KerasFormat::TfCheckpoint)));
        }
        bail!("a folder that is neither a SavedModel (no saved_model.pb) nor a TF checkpoint folder (no `checkpoint` file)");
    }
    let text = path.to_string_lossy();
    if let Some(prefix) = text.strip_suffix(".index") {
        return Ok(Some((PathBuf::from(prefix), KerasFormat::TfCheckpoint)));
    }
    if let Some(at) = text.rfind(".data-").filter(|at| text[at + 6..].contains("-of-")) {
        return Ok(Some((PathBuf::from(&text[..at]), KerasFormat::TfCheckpoint)));
    }
    if is_checkpoint_prefix(path) {
        return Ok(Some((path.to_owned(), KerasFormat::TfCheckpoint)));
    }
    Ok(None)
}

/// A TF checkpoint prefix, as `save_weights("ckpt/ckpt")` takes it: no such file or folder, but
/// `{path}.index` is a file.
pub fn is_checkpoint_prefix(path: &Path) -> bool {
    !path.exists() && Path::new(&format!("{}.index", path.to_string_lossy())).is_file()
}

pub(super) fn collect_datasets(group: &hdf5::Group, path: &str, out: &mut Vec<String>) -> Result<()> {
    for name in group.member_names()? {
        let child = format!("{path}/{name}");
        if let Ok(g) = group.group(&name) {
            collect_datasets(&g, &child, out)?;
        } else {
            out.push(child);
        }
    }
    Ok(())
}

/// The element type of a dataset: float32, float16, or Keras 3's bfloat16 (a 2-byte opaque type
/// with an attribute `dtype` = "bfloat16", which the hdf5 crate's type descriptors cannot name).
fn element_dtype(ds: &hdf5::Dataset, path: &str) -> Result<DType> {
    const EXPECTED: &str = "expected float32, float16 or Keras' bfloat16";
    let datatype = ds.dtype().with_context(|| format!("tensor `{path}`: unreadable element type"))?;
    match datatype.to_descriptor() {
        Ok(TypeDescriptor::Float(FloatSize::U4)) => Ok(DType::F32),
        Ok(TypeDescriptor::Float(FloatSize::U2)) => Ok(DType::F16),
        Ok(other) => bail!("tensor `{path}`: unsupported element type {other:?} ({EXPECTED})"),
        Err(_) if h5ffi::type_class(&datatype) == h5ffi::H5T_OPAQUE => {
            let size = datatype.size();
            let tag = read_string(ds, "dtype").ok().flatten();
            if size == 2 && tag.as_deref() == Some("bfloat16") {
                return Ok(DType::BF16);
            }
            let tag = tag.map_or_else(|| "no `dtype` attribute".to_string(), |t| format!("`dtype` = {t:?}"));
            bail!("tensor `{path}`: unsupported element type: {size}-byte opaque data with {tag} ({EXPECTED}: 2 bytes with `dtype` = \"bfloat16\")")
        }
        Err(e) => bail!("tensor `{path}`: unsupported element type (HDF5 type class {}: {e}; {EXPECTED})", h5ffi::type_class(&datatype)),
    }
}

/// HDF5 files start with an 8-byte signature at offset 0, 512, 1024, 2048, … (after a user block).
fn check_signature(path: &Path) -> Result<()> {
    let mut file = std::fs::File::open(path).context("cannot open")?;
    let len = file.metadata()?.len();
    let mut head = vec![0u8; len.min(1 << 16) as usize];
    file.read_exact(&mut head)?;
    let mut offset = 0usize;
    while offset + 8 <= head.len() {
        if &head[offset..offset + 8] == HDF5_SIGNATURE {
            return Ok(());
        }
        offset = if offset == 0 { 512 } else { offset * 2 };
    }
    bail!("not an HDF5 file (no HDF5 signature)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A legacy file with one contiguous dataset (read from the map) and one chunked one (read
    /// by libhdf5), both f32 [3, 5].
    fn two_layouts(path: &Path) -> Vec<f32> {
        let values: Vec<f32> = (0..15).map(|v| v as f32 * 0.5 - 3.0).collect();
        let array = ndarray::Array2::from_shape_vec((3, 5), values.clone()).unwrap();
        let file = hdf5::File::create(path).unwrap();
        file.new_dataset_builder().with_data(&array).create("contiguous").unwrap();
        file.new_dataset_builder().chunk((1, 5)).with_data(&array).create("chunked").unwrap();
        values
    }

    #[test]
    fn mapped_and_libhdf5_reads_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.h5");
        let values = two_layouts(&path);
        let hdf5 = hdf5::File::open(&path).unwrap();
        assert!(hdf5.dataset("contiguous").unwrap().offset().is_some());
        assert!(hdf5.dataset("chunked").unwrap().offset().is_none());
        let map = unsafe { memmap2::Mmap::map(&std::fs::File::open(&path).unwrap()) }.ok();
        let file = KerasFile { path: path.clone(), format: KerasFormat::Keras3, layers: Vec::new(), keras_version: None, backend: Backend::Hdf5(H5 { file: hdf5, map }, None) };
        for name in ["contiguous", "chunked"] {
            let (dtype, shape, bytes) = file.with_bytes(name, |d, s, b| (d, s.to_vec(), b.to_vec())).unwrap();
            assert_eq!((dtype, shape.as_slice()), (DType::F32, &[3usize, 5][..]), "{name}");
            assert_eq!(bytes, bytemuck::cast_slice::<f32, u8>(&values), "{name}");
            assert_eq!(file.read(name).unwrap().data, bytes, "{name}");
        }
        assert!(file.with_bytes("missing", |_, _, _| ()).unwrap_err().to_string().contains("tensor `missing`: not found"));
    }

    fn bf16_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect()
    }

    /// Every way of getting a dataset's bytes, which must agree.
    fn all_reads(file: &KerasFile, path: &str) -> (DType, Vec<usize>, Vec<u8>) {
        let info = file.info(path).unwrap();
        let (dtype, shape, bytes) = file.with_bytes(path, |d, s, b| (d, s.to_vec(), b.to_vec())).unwrap();
        let raw = file.read(path).unwrap();
        assert_eq!((info.dtype, &info.shape), (dtype, &shape), "{path}: info");
        assert_eq!((raw.dtype, &raw.shape, &raw.data), (dtype, &shape, &bytes), "{path}: read and with_bytes");
        (dtype, shape, bytes)
    }

    /// Keras 3's bfloat16 (a 2-byte opaque type tagged by a `dtype` attribute), contiguous (read
    /// from the map) and chunked (read by libhdf5 in its own type); opaque data not tagged
    /// bfloat16 stays refused, naming the tensor.
    #[test]
    fn keras3_bfloat16_datasets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.weights.h5");
        let kernel: Vec<f32> = (0..15).map(|v| v as f32 * 0.375 - 2.0).collect();
        let bias = [0.5f32, -1.25, 3.0, 1e-3, 65504.0, -7.5];
        {
            let file = hdf5::File::create(&path).unwrap();
            let vars = file.create_group("layers/dense/vars").unwrap();
            h5ffi::write_opaque(&vars, "0", &[3, 5], &bf16_bytes(&kernel), None, Some("bfloat16")).unwrap();
            h5ffi::write_opaque(&vars, "1", &[6], &bf16_bytes(&bias), Some(&[4]), Some("bfloat16")).unwrap();
            let bad = file.create_group("layers/bad/vars").unwrap();
            h5ffi::write_opaque(&bad, "0", &[2], &[0; 4], None, None).unwrap();
            h5ffi::write_opaque(&bad, "1", &[2], &[0; 4], None, Some("float8_e4m3")).unwrap();
            bad.new_dataset_builder().with_data(&[1u16, 2]).create("2").unwrap();
        }
        let file = KerasFile::open(&path).unwrap();
        assert_eq!(file.format, KerasFormat::Keras3);
        {
            let hdf5 = &file.dataset("layers/dense/vars/0").unwrap().1;
            assert!(hdf5.offset().is_some(), "contiguous");
            assert!(file.dataset("layers/dense/vars/1").unwrap().1.offset().is_none(), "chunked");
            assert_eq!(h5ffi::type_class(&hdf5.dtype().unwrap()), h5ffi::H5T_OPAQUE);
        }
        assert_eq!(all_reads(&file, "layers/dense/vars/0"), (DType::BF16, vec![3, 5], bf16_bytes(&kernel)));
        assert_eq!(all_reads(&file, "layers/dense/vars/1"), (DType::BF16, vec![6], bf16_bytes(&bias)));
        let lines: Vec<String> = format!("{:#}", file.keras3_datasets().unwrap_err()).lines().map(str::to_string).collect();
        assert_eq!(lines.len(), 1, "one line: {lines:?}");
        for (name, says) in [
            ("layers/bad/vars/0", "2-byte opaque data with no `dtype` attribute"),
            ("layers/bad/vars/1", "2-byte opaque data with `dtype` = \"float8_e4m3\""),
            ("layers/bad/vars/2", "unsupported element type Unsigned(U2)"),
        ] {
            for e in [file.info(name).unwrap_err(), file.read(name).unwrap_err(), file.with_bytes(name, |_, _, _| ()).unwrap_err()] {
                let text = format!("{e:#}");
                assert!(text.starts_with(&format!("tensor `{name}`: unsupported element type")) && text.contains(says) && !text.contains('\n'), "{text}");
            }
        }
    }

    /// `fixtures/kerashub/expected.json`: every dataset of the fixtures, with dtype, shape and
    /// values (as float32), as keras wrote them.
    fn expected_fixtures() -> serde_json::Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kerashub/expected.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// Checks every dataset of a file keras wrote against the values keras had.
    fn check_against_keras(file: &KerasFile) {
        let expected = expected_fixtures();
        let expected = expected["datasets"].as_object().unwrap();
        let listed: Vec<String> = file.keras3_datasets().unwrap().into_iter().map(|(p, _)| p).collect();
        assert_eq!(listed, expected.keys().cloned().collect::<Vec<_>>());
        let mut bf16 = 0;
        for (path, want) in expected {
            let (dtype, shape, bytes) = all_reads(file, path);
            let want_dtype = match want["dtype"].as_str().unwrap() {
                "bfloat16" => DType::BF16,
                "float32" => DType::F32,
                other => panic!("{other}"),
            };
            assert_eq!(dtype, want_dtype, "{path}");
            bf16 += usize::from(dtype == DType::BF16);
            assert_eq!(shape, want["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect::<Vec<_>>(), "{path}");
            let values: Vec<f32> = match dtype {
                DType::BF16 => bytes.chunks(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                _ => bytes.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            };
            let want: Vec<f32> = want["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(values, want, "{path}");
        }
        assert_eq!(bf16, 4, "the fixture's bfloat16 datasets");
    }

    #[test]
    fn kerashub_bf16_fixture_reads_as_keras_wrote_it() {
        let file = KerasFile::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kerashub/bf16.weights.h5")).unwrap();
        assert_eq!(file.format, KerasFormat::Keras3);
        check_against_keras(&file);
    }

    #[test]
    fn kerashub_sharded_fixture_reads_as_one_file() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kerashub");
        let file = KerasFile::open(&dir.join("sharded.weights.json")).unwrap();
        assert_eq!(file.format, KerasFormat::Keras3);
        check_against_keras(&file);
        // The fixture is what it claims: three shards, `layers/dense/vars` split over two.
        let Backend::Sharded(sharded) = &file.backend else { panic!("not sharded") };
        assert_eq!(expected_fixtures()["shards"].as_array().unwrap().len(), 3);
        let owner = |p: &str| sharded.dataset(p).map(|(h5, _)| h5 as *const H5);
        assert_ne!(owner("layers/dense/vars/0"), owner("layers/dense/vars/1"));
        for group in ["layers", "layers/sequential", "layers/sequential/layers/dense", "layers/dense/vars", "/layers/dense_1/vars/"] {
            assert!(file.has_dataset(group), "{group}");
        }
        for absent in ["layers/dens", "layers/dense/vars/2", "layers/mm_di_t", "layers/input_layer/vars/0"] {
            assert!(!file.has_dataset(absent), "{absent}");
            let e = format!("{:#}", file.info(absent).unwrap_err());
            assert!(e.starts_with(&format!("tensor `{absent}`: not found")) && !e.contains('\n'), "{e}");
        }
        // The same bytes as the unsharded save.
        let single = KerasFile::open(&dir.join("bf16.weights.h5")).unwrap();
        for (path, info) in single.keras3_datasets().unwrap() {
            assert_eq!(file.info(&path).unwrap(), info, "{path}");
            assert_eq!(file.read(&path).unwrap().data, single.read(&path).unwrap().data, "{path}");
        }
    }
}
