//! PyTorch `.ckpt` / `.pt` / `.pth` files (the zip archive `torch.save` writes) read without running
//! any pickled code. candle's pickle interpreter turns `data.pkl` into a tree of plain values;
//! every global that tree names must be one `torch.load(weights_only=True)` would accept for a
//! state dict (tensor rebuilders, storage types, `OrderedDict`), or one of the training-metadata
//! classes that original Stable Diffusion checkpoints carry beside the weights (Lightning's
//! `ModelCheckpoint` state, NumPy scalars) — which are never built, only skipped. Anything else
//! (`os.system`, `builtins.eval`, ...) refuses the whole file.

use crate::tensor::{DType, RawTensor, TensorInfo, TensorSource};
use anyhow::{bail, ensure, Context, Result};
use candle_core::pickle::{Object, Stack};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Globals a state dict is made of.
const TENSOR_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

/// Metadata classes found outside the state dict of original checkpoints (never built).
const METADATA_GLOBALS: &[(&str, &str)] = &[
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
];

/// One tensor's place in the archive.
#[derive(Clone, Debug)]
struct Entry {
    dtype: Result<DType, String>,
    shape: Vec<usize>,
    /// Zip entry of the storage and the byte offset of the tensor in it.
    /// (`dtype` holds why the tensor cannot be read, for tensors no conversion needs.)
    storage: String,
    offset: usize,
}

/// Opens the zip archive of a `torch.save` file, which starts at the file's first byte.
///
/// torch (miniz) always writes a zip64 end record and its locator between the central directory
/// and the classic end record, and fills the classic one with the real offset and size while they
/// fit in 32 bits. The zip crate's default offset detection (`ArchiveOffset::Detect`) then first
/// looks for a directory that ends right at the classic end record, 76 bytes (those two zip64
/// records) past the real start; when the first central entry is itself 76 bytes long (`data.pkl`
/// under a 21-character archive name, such as `sdxl-tiny-script-fp16`, the file's stem) a header
/// is there, the whole directory is read 76 bytes late and the file is refused as "Invalid Central
/// Directory header". So the offset is given as 0; detection stays as the fallback for an archive
/// behind a prefix.
fn open_archive(path: &Path) -> Result<zip::ZipArchive<std::io::BufReader<std::fs::File>>> {
    let open = || -> Result<std::io::BufReader<std::fs::File>> { Ok(std::io::BufReader::new(std::fs::File::open(path).context("cannot open")?)) };
    let at_start = zip::read::Config { archive_offset: zip::read::ArchiveOffset::Known(0) };
    if let Ok(zip) = zip::ZipArchive::with_config(at_start, open()?) {
        return Ok(zip);
    }
    zip::ZipArchive::new(open()?).map_err(|e| anyhow::anyhow!("not a readable torch checkpoint archive ({e}; truncated?)"))
}

/// A torch zip checkpoint's state dict.
pub struct Checkpoint {
    path: PathBuf,
    entries: BTreeMap<String, Entry>,
    zip: Mutex<zip::ZipArchive<std::io::BufReader<std::fs::File>>>,
    /// Plain values beside the state dict (`global_step`, `epoch`), as text.
    pub extras: BTreeMap<String, String>,
}

/// True when the file starts like a zip archive (what `torch.save` writes since torch 1.6).
pub fn looks_like_torch_zip(head: &[u8]) -> bool {
    head.starts_with(b"PK\x03\x04")
}

/// True for the pickle-only format of torch before 1.6 (and for a bare pickle).
pub fn looks_like_legacy_pickle(head: &[u8]) -> bool {
    head.first() == Some(&0x80)
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let mut zip = open_archive(path)?;
        let pickle_name = (0..zip.len())
            .filter_map(|i| zip.name_for_index(i)?.ok().map(|n| n.to_string()))
            .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
            .context("no data.pkl in the archive (not a torch.save checkpoint)")?;
        let dir = pickle_name.strip_suffix(".pkl").unwrap().to_string();
        let mut bytes = Vec::new();
        zip.by_name(&pickle_name)?.read_to_end(&mut bytes).context("cannot read data.pkl (truncated?)")?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut std::io::BufReader::new(&bytes[..]))
            .map_err(|e| anyhow::anyhow!("data.pkl is not a pickle this reader understands: {e}"))?;
        let root = stack.finalize().map_err(|e| anyhow::anyhow!("data.pkl: {e}"))?;
        let (state, extras) = split_state_dict(root)?;
        let mut entries = BTreeMap::new();
        for (name, value) in state {
            let Object::Unicode(name) = name else { bail!("the state dict has a key that is not a string: {name:?}") };
            check_globals(&value, TENSOR_GLOBALS, &[]).with_context(|| format!("tensor `{name}`"))?;
            entries.insert(name, tensor_entry(value, &dir));
        }
        ensure!(!entries.is_empty(), "the checkpoint holds no tensors");
        Ok(Checkpoint { path: path.to_owned(), entries, zip: Mutex::new(zip), extras })
    }
}

/// The state dict (the `state_dict` entry if there is one, else the whole dict) and the plain
/// values beside it. Every global anywhere in the file is checked.
fn split_state_dict(root: Object) -> Result<(Vec<(Object, Object)>, BTreeMap<String, String>)> {
    let Object::Dict(items) = root else { bail!("data.pkl does not hold a dict of tensors") };
    let has_state = items.iter().any(|(k, _)| *k == Object::Unicode("state_dict".into()));
    if !has_state {
        return Ok((items, BTreeMap::new()));
    }
    let mut state = None;
    let mut extras = BTreeMap::new();
    for (k, v) in items {
        match (k, v) {
            (Object::Unicode(k), Object::Dict(d)) if k == "state_dict" => state = Some(d),
            (Object::Unicode(k), v) => {
                check_globals(&v, TENSOR_GLOBALS, METADATA_GLOBALS).with_context(|| format!("entry `{k}`"))?;
                match v {
                    Object::Int(i) => drop(extras.insert(k, i.to_string())),
                    Object::Long(i) => drop(extras.insert(k, i.to_string())),
                    Object::Float(f) => drop(extras.insert(k, f.to_string())),
                    Object::Unicode(s) => drop(extras.insert(k, s)),
                    _ => {}
                }
            }
            (k, v) => check_globals(&v, TENSOR_GLOBALS, METADATA_GLOBALS).with_context(|| format!("entry {k:?}"))?,
        }
    }
    Ok((state.context("`state_dict` is not a dict")?, extras))
}

/// Refuses any global outside `allowed` and `skipped`.
fn check_globals(obj: &Object, allowed: &[(&str, &str)], skipped: &[(&str, &str)]) -> Result<()> {
    let known = |m: &str, c: &str, list: &[(&str, &str)]| list.iter().any(|(lm, lc)| *lm == m && *lc == c);
    match obj {
        Object::Class { module_name, class_name } => {
            if !known(module_name, class_name, allowed) && !known(module_name, class_name, skipped) {
                bail!(
                    "refused: the pickle names the global `{module_name}.{class_name}`, which is not part of a tensor \
                     state dict (dreambridge never runs pickled code; re-save the weights as safetensors if the file is trusted)"
                );
            }
            Ok(())
        }
        Object::Tuple(v) | Object::List(v) => v.iter().try_for_each(|o| check_globals(o, allowed, skipped)),
        Object::Dict(kv) => kv.iter().try_for_each(|(k, v)| {
            check_globals(k, allowed, skipped)?;
            check_globals(v, allowed, skipped)
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            check_globals(callable, allowed, skipped)?;
            check_globals(args, allowed, skipped)
        }
        Object::PersistentLoad(o) => check_globals(o, allowed, skipped),
        _ => Ok(()),
    }
}

/// The entry of a state-dict value; what cannot be read (not a tensor, an unsupported storage)
/// is kept as the reason, reported only if a conversion needs the tensor.
fn tensor_entry(value: Object, dir: &str) -> Entry {
    let unreadable = |why: String| Entry { dtype: Err(why), shape: vec![], storage: String::new(), offset: 0 };
    match value.into_tensor_info(Object::Unicode(String::new()), Path::new(dir)) {
        Ok(Some(info)) => readable_entry(info),
        Ok(None) => unreadable("not a tensor".into()),
        Err(e) => unreadable(format!("cannot be read ({e})")),
    }
}

fn readable_entry(info: candle_core::pickle::TensorInfo) -> Entry {
    let layout = &info.layout;
    let shape = layout.dims().to_vec();
    let mut expected = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        expected[d] = expected[d + 1] * shape[d + 1];
    }
    let dense = shape.iter().zip(layout.stride()).zip(&expected).all(|((n, s), e)| *n <= 1 || s == e);
    let dtype = match info.dtype {
        _ if !dense => Err(format!("a view with strides {:?} (only row-major tensors are read; save `.contiguous()` copies)", layout.stride())),
        candle_core::DType::F32 => Ok(DType::F32),
        candle_core::DType::F16 => Ok(DType::F16),
        candle_core::DType::BF16 => Ok(DType::BF16),
        other => Err(format!("unsupported dtype {other:?} (expected float32, float16 or bfloat16)")),
    };
    Entry { dtype, shape, storage: info.path, offset: layout.start_offset() }
}

impl TensorSource for Checkpoint {
    fn origin(&self) -> &Path {
        &self.path
    }

    fn keys(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    fn info(&self, key: &str) -> Result<TensorInfo> {
        let e = self.entries.get(key).with_context(|| format!("tensor `{key}`: not found"))?;
        let dtype = e.dtype.clone().map_err(|why| anyhow::anyhow!("tensor `{key}`: {why}"))?;
        Ok(TensorInfo { dtype, shape: e.shape.clone() })
    }

    fn read(&self, key: &str) -> Result<RawTensor> {
        let info = self.info(key)?;
        let e = &self.entries[key];
        let len = info.shape.iter().product::<usize>() * info.dtype.size();
        let mut zip = self.zip.lock().expect("zip reader poisoned");
        let mut entry = zip.by_name(&e.storage).with_context(|| format!("tensor `{key}`: storage `{}` missing from the archive", e.storage))?;
        ensure!(
            (e.offset + len) as u64 <= entry.size(),
            "tensor `{key}`: storage `{}` holds {} bytes, the tensor needs {} from byte {}",
            e.storage,
            entry.size(),
            len,
            e.offset
        );
        std::io::copy(&mut (&mut entry).take(e.offset as u64), &mut std::io::sink())?;
        let mut data = vec![0u8; len];
        entry.read_exact(&mut data).with_context(|| format!("tensor `{key}`: cannot read its data (truncated?)"))?;
        Ok(RawTensor { dtype: info.dtype, shape: info.shape, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(m: &str, c: &str) -> Object {
        Object::Class { module_name: m.into(), class_name: c.into() }
    }

    #[test]
    fn only_state_dict_globals_pass() {
        let tensor = Object::Reduce { callable: Box::new(class("torch._utils", "_rebuild_tensor_v2")), args: Box::new(Object::Tuple(vec![])) };
        assert!(check_globals(&tensor, TENSOR_GLOBALS, &[]).is_ok());
        let evil = Object::Reduce { callable: Box::new(class("posix", "system")), args: Box::new(Object::Tuple(vec![Object::Unicode("id".into())])) };
        let err = check_globals(&Object::Dict(vec![(Object::Unicode("x".into()), evil.clone())]), TENSOR_GLOBALS, METADATA_GLOBALS).unwrap_err();
        assert!(err.to_string().contains("`posix.system`"), "{err}");
        // Metadata classes are skipped beside the state dict but not inside it.
        let lightning = class("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint");
        assert!(check_globals(&lightning, TENSOR_GLOBALS, METADATA_GLOBALS).is_ok());
        assert!(check_globals(&lightning, TENSOR_GLOBALS, &[]).is_err());
    }

    /// A zip laid out as `torch.save` writes it (stored entries; a zip64 end record and locator
    /// before a classic end record holding the real 32-bit offset and size), the first central
    /// entry being `name`.
    fn torch_like_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let (mut out, mut central) = (Vec::new(), Vec::new());
        let le16 = |v: usize| (v as u16).to_le_bytes();
        let le32 = |v: usize| (v as u32).to_le_bytes();
        for (name, data) in entries {
            let offset = out.len();
            let crc = crc32(data);
            for part in [&b"PK\x03\x04"[..], &le16(20), &le16(0), &le16(0), &le16(0), &le16(0), &crc.to_le_bytes(), &le32(data.len()), &le32(data.len()), &le16(name.len()), &le16(0), name.as_bytes(), data] {
                out.extend_from_slice(part);
            }
            for part in [&b"PK\x01\x02"[..], &le16(20), &le16(20), &le16(0), &le16(0), &le16(0), &le16(0), &crc.to_le_bytes(), &le32(data.len()), &le32(data.len())] {
                central.extend_from_slice(part);
            }
            for part in [&le16(name.len())[..], &le16(0), &le16(0), &le16(0), &le16(0), &le32(0), &le32(offset), name.as_bytes()] {
                central.extend_from_slice(part);
            }
        }
        let (cd_offset, cd_size, n) = (out.len(), central.len(), entries.len());
        out.extend_from_slice(&central);
        let end64 = out.len();
        for part in [&b"PK\x06\x06"[..], &44u64.to_le_bytes(), &le16(45), &le16(45), &le32(0), &le32(0), &(n as u64).to_le_bytes(), &(n as u64).to_le_bytes(), &(cd_size as u64).to_le_bytes(), &(cd_offset as u64).to_le_bytes()] {
            out.extend_from_slice(part);
        }
        for part in [&b"PK\x06\x07"[..], &le32(0), &(end64 as u64).to_le_bytes(), &le32(1)] {
            out.extend_from_slice(part);
        }
        for part in [&b"PK\x05\x06"[..], &le16(0), &le16(0), &le16(n), &le16(n), &le32(cd_size), &le32(cd_offset), &le16(0)] {
            out.extend_from_slice(part);
        }
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn torch_archives_whose_first_central_entry_is_as_long_as_the_zip64_records_open() {
        let dir = tempfile::tempdir().unwrap();
        // `<21 characters>/data.pkl`: its central entry is 46 + 30 = 76 bytes, the size of the
        // zip64 end record (56) and locator (20).
        for stem in ["sdxl-tiny-script-fp16", "archive"] {
            let path = dir.path().join(format!("{stem}.ckpt"));
            let names = [format!("{stem}/data.pkl"), format!("{stem}/byteorder"), format!("{stem}/data/0")];
            let entries: Vec<(&str, &[u8])> = vec![(&names[0], b"\x80\x02}q\x00."), (&names[1], b"little"), (&names[2], &[7u8; 64])];
            std::fs::write(&path, torch_like_zip(&entries)).unwrap();
            let mut zip = open_archive(&path).unwrap_or_else(|e| panic!("{stem}: {e:#}"));
            assert_eq!(zip.len(), 3, "{stem}");
            let mut data = Vec::new();
            zip.by_name(&names[2]).unwrap().read_to_end(&mut data).unwrap();
            assert_eq!(data, [7u8; 64], "{stem}");
        }
    }

    #[test]
    fn wrapped_state_dicts_are_unwrapped_and_extras_kept() {
        let root = Object::Dict(vec![
            (Object::Unicode("global_step".into()), Object::Int(875000)),
            (Object::Unicode("state_dict".into()), Object::Dict(vec![])),
        ]);
        let (state, extras) = split_state_dict(root).unwrap();
        assert!(state.is_empty());
        assert_eq!(extras["global_step"], "875000");
        assert!(split_state_dict(Object::List(vec![])).is_err());
    }
}
