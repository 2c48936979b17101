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
        let file = std::fs::File::open(path).context("cannot open")?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .map_err(|e| anyhow::anyhow!("not a readable torch checkpoint archive ({e}; truncated?)"))?;
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
