//! Keras 3 sharded weights, as `ShardedH5IOStore` writes them (`save_weights("x.weights.json",
//! max_shard_size=…)`, and KerasHub's `save_to_preset` above 10 GB): a JSON map
//! `{"metadata": {...}, "weight_map": {"/layers/…/vars": ["x_00000.weights.h5", …]}}` beside the
//! shards `x_00000.weights.h5`, `x_00001.weights.h5`, …, each a Keras 3 `.weights.h5` holding
//! some of the `vars` groups. The map's keys are `vars` groups (a group's datasets may be split
//! over several shards, listed in order); a key naming a dataset itself is read the same way.

use super::reader::H5;
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

pub(super) struct Sharded {
    /// Every key of the weight map (without its leading `/`) and the shards it names, in order.
    groups: BTreeMap<String, Vec<usize>>,
    shards: Vec<Shard>,
}

struct Shard {
    name: String,
    h5: H5,
}

impl Sharded {
    /// Reads the map at `json` and opens every shard it names (a missing, truncated or non-HDF5
    /// shard is an error naming it).
    pub(super) fn open(json: &Path) -> Result<Sharded> {
        let text = std::fs::read_to_string(json).context("cannot read")?;
        let config: Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("not JSON ({e}); is the file truncated?"))?;
        let map = config
            .get("weight_map")
            .and_then(Value::as_object)
            .context("no `weight_map` object: not a Keras sharded-weights map (`model.weights.json`)")?;
        ensure!(!map.is_empty(), "an empty `weight_map`");
        let folder = json.parent().unwrap_or(Path::new("."));
        let mut names: Vec<String> = Vec::new();
        let mut groups = BTreeMap::new();
        for (key, value) in map {
            let files: Vec<&str> = match value {
                Value::String(name) => vec![name.as_str()],
                Value::Array(list) => list.iter().map(Value::as_str).collect::<Option<_>>().with_context(|| format!("weight_map `{key}`: not a list of file names"))?,
                _ => bail!("weight_map `{key}`: not a file name or a list of them"),
            };
            ensure!(!files.is_empty(), "weight_map `{key}`: names no shard");
            let mut shards = Vec::new();
            for name in files {
                ensure!(
                    !name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != "..",
                    "weight_map `{key}`: shard `{name}` is not a file name beside the map"
                );
                let index = names.iter().position(|n| n == name).unwrap_or_else(|| {
                    names.push(name.to_string());
                    names.len() - 1
                });
                if !shards.contains(&index) {
                    shards.push(index);
                }
            }
            groups.insert(key.trim_matches('/').to_string(), shards);
        }
        let shards = names
            .into_iter()
            .map(|name| {
                let h5 = H5::open(&folder.join(&name)).with_context(|| format!("shard `{name}` (listed in the weight map)"))?;
                Ok(Shard { name, h5 })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Sharded { groups, shards })
    }

    /// Whether `path` is a group or dataset of the weights: a key of the map, a group above one,
    /// or a dataset in a shard the map names for it.
    pub(super) fn has_path(&self, path: &str) -> bool {
        let path = path.trim_matches('/');
        if path.is_empty() || self.groups.contains_key(path) {
            return true;
        }
        let prefix = format!("{path}/");
        if self.groups.range(prefix.clone()..).next().is_some_and(|(k, _)| k.starts_with(&prefix)) {
            return true;
        }
        self.dataset(path).is_some()
    }

    /// The dataset at `path` and the file holding it: looked up in the shards the map names for
    /// `path` itself or for its group, in order.
    pub(super) fn dataset(&self, path: &str) -> Option<(&H5, hdf5::Dataset)> {
        let path = path.trim_matches('/');
        let owners = self.groups.get(path).or_else(|| path.rsplit_once('/').and_then(|(group, _)| self.groups.get(group)))?;
        owners.iter().find_map(|&i| {
            let h5 = &self.shards[i].h5;
            h5.file.dataset(path).ok().map(|ds| (h5, ds))
        })
    }

    /// Every dataset under `root` (a group path such as `layers`), sorted.
    pub(super) fn datasets_under(&self, root: &str) -> Result<Vec<String>> {
        let prefix = format!("{}/", root.trim_matches('/'));
        let mut out = BTreeSet::new();
        for (key, owners) in self.groups.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)) {
            for &i in owners {
                let shard = &self.shards[i];
                if let Ok(group) = shard.h5.file.group(key) {
                    let mut found = Vec::new();
                    super::reader::collect_datasets(&group, key, &mut found)?;
                    out.extend(found);
                } else if shard.h5.file.dataset(key).is_ok() {
                    out.insert(key.clone());
                } else {
                    bail!("shard `{}`: the weight map places `/{key}` there, but it lacks it", shard.name);
                }
            }
        }
        Ok(out.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use crate::keras::{KerasFile, KerasFormat};
    use crate::tensor::DType;
    use std::path::Path;

    /// Three shards as `ShardedH5IOStore` lays them out: `layers/a/vars` split over the first two
    /// (a list in the map), `layers/b/vars` (bfloat16) in the third (a plain string, as older
    /// Keras wrote), a nested `layers/enc/layers/c/vars`, and a group (`layers/stray`) that a
    /// shard holds but the map does not name.
    fn write_sharded(dir: &Path) {
        let shard = |n: usize| hdf5::File::create(dir.join(format!("model_{n:05}.weights.h5"))).unwrap();
        let s0 = shard(0);
        let a = s0.create_group("layers/a/vars").unwrap();
        a.new_dataset_builder().with_data(&ndarray::arr2(&[[1.0f32, 2.0], [3.0, 4.0]])).create("0").unwrap();
        s0.create_group("layers/stray/vars").unwrap().new_dataset_builder().with_data(&[9.0f32]).create("0").unwrap();
        let s1 = shard(1);
        let a = s1.create_group("layers/a/vars").unwrap();
        a.new_dataset_builder().with_data(&[half::f16::from_f32(0.5), half::f16::from_f32(-2.0)]).create("1").unwrap();
        s1.create_group("layers/enc/layers/c/vars").unwrap().new_dataset_builder().with_data(&[7.0f32; 3]).create("0").unwrap();
        let s2 = shard(2);
        let b = s2.create_group("layers/b/vars").unwrap();
        let bytes: Vec<u8> = [1.5f32, -0.25, 8.0].iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        super::super::h5ffi::write_opaque(&b, "0", &[3], &bytes, None, Some("bfloat16")).unwrap();
        let map = serde_json::json!({
            "metadata": {"total_size": 42.0},
            "weight_map": {
                "/layers/a/vars": ["model_00000.weights.h5", "model_00001.weights.h5"],
                "/layers/enc/layers/c/vars": ["model_00001.weights.h5"],
                "/layers/b/vars": "model_00002.weights.h5",
            }
        });
        std::fs::write(dir.join("model.weights.json"), serde_json::to_string_pretty(&map).unwrap()).unwrap();
    }

    fn one_line_error(e: anyhow::Error) -> String {
        let text = format!("{e:#}");
        assert!(!text.contains('\n'), "{text}");
        text
    }

    #[test]
    fn shards_read_as_one_file() {
        let dir = tempfile::tempdir().unwrap();
        write_sharded(dir.path());
        let file = KerasFile::open(&dir.path().join("model.weights.json")).unwrap();
        assert_eq!(file.format, KerasFormat::Keras3);
        let listed: Vec<(String, DType, Vec<usize>)> = file.keras3_datasets().unwrap().into_iter().map(|(p, i)| (p, i.dtype, i.shape)).collect();
        assert_eq!(
            listed,
            [
                ("layers/a/vars/0".to_string(), DType::F32, vec![2, 2]),
                ("layers/a/vars/1".to_string(), DType::F16, vec![2]),
                ("layers/b/vars/0".to_string(), DType::BF16, vec![3]),
                ("layers/enc/layers/c/vars/0".to_string(), DType::F32, vec![3]),
            ]
        );
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert_eq!(file.read("layers/a/vars/0").unwrap().data, f32s(&[1.0, 2.0, 3.0, 4.0]));
        assert_eq!(file.read("layers/a/vars/1").unwrap().data, [half::f16::from_f32(0.5), half::f16::from_f32(-2.0)].iter().flat_map(|h| h.to_le_bytes()).collect::<Vec<_>>());
        let bf16 = file.with_bytes("layers/b/vars/0", |d, s, b| (d, s.to_vec(), b.to_vec())).unwrap();
        assert_eq!(bf16, (DType::BF16, vec![3], [1.5f32, -0.25, 8.0].iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect()));
        assert_eq!(file.with_bytes("layers/enc/layers/c/vars/0", |_, _, b| b.to_vec()).unwrap(), f32s(&[7.0; 3]));
        for present in ["layers", "layers/a", "layers/a/vars", "layers/a/vars/1", "layers/enc", "layers/enc/layers/c/vars/0", "layers/b/vars/0"] {
            assert!(file.has_dataset(present), "{present}");
        }
        // By the map: a group no key names is absent even where a shard holds it.
        for absent in ["layers/stray", "layers/stray/vars/0", "layers/a/vars/2", "layers/b/vars/1", "layers/c", "layers/a-b", "nothing/here"] {
            assert!(!file.has_dataset(absent), "{absent}");
            for e in [file.info(absent).unwrap_err(), file.read(absent).unwrap_err(), file.with_bytes(absent, |_, _, _| ()).unwrap_err()] {
                assert!(one_line_error(e).starts_with(&format!("tensor `{absent}`: not found")), "{absent}");
            }
        }
    }

    #[test]
    fn broken_shards_and_maps_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write_sharded(dir.path());
        let json = dir.path().join("model.weights.json");
        let open_error = |json: &Path| one_line_error(KerasFile::open(json).err().expect("opens"));

        // A truncated shard (cut in its data), then an empty one, then a missing one.
        let shard = dir.path().join("model_00001.weights.h5");
        let whole = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &whole[..whole.len() / 2]).unwrap();
        let e = open_error(&json);
        assert!(e.starts_with("shard `model_00001.weights.h5` (listed in the weight map): ") && e.contains("truncated"), "{e}");
        std::fs::write(&shard, b"").unwrap();
        assert!(open_error(&json).starts_with("shard `model_00001.weights.h5` (listed in the weight map): not an HDF5 file"));
        std::fs::remove_file(&shard).unwrap();
        let e = open_error(&json);
        assert!(e.starts_with("shard `model_00001.weights.h5` (listed in the weight map): cannot open"), "{e}");
        std::fs::write(&shard, whole).unwrap();
        assert!(KerasFile::open(&json).is_ok());

        // Maps that are not Keras'.
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let cases = [
            ("cut.weights.json", r#"{"weight_map": {"/layers/a/vars": ["model_0"#, "not JSON"),
            ("other.json", r#"{"metadata": {}}"#, "no `weight_map` object"),
            ("empty.weights.json", r#"{"weight_map": {}}"#, "an empty `weight_map`"),
            ("up.weights.json", r#"{"weight_map": {"/layers/a/vars": "../model_00000.weights.h5"}}"#, "is not a file name beside the map"),
            ("num.weights.json", r#"{"weight_map": {"/layers/a/vars": [3]}}"#, "not a list of file names"),
            ("gone.weights.json", r#"{"weight_map": {"/layers/a/vars": "model_00009.weights.h5"}}"#, "shard `model_00009.weights.h5` (listed in the weight map): cannot open"),
        ];
        for (name, text, says) in cases {
            let e = open_error(&write(name, text));
            assert!(e.contains(says), "{name}: {e}");
        }
        // A map placing a group in a shard that lacks it: listing the datasets names both.
        let file = KerasFile::open(&write("wrong.weights.json", r#"{"weight_map": {"/layers/a/vars": ["model_00002.weights.h5"]}}"#)).unwrap();
        let e = one_line_error(file.keras3_datasets().unwrap_err());
        assert!(e.contains("shard `model_00002.weights.h5`") && e.contains("`/layers/a/vars`"), "{e}");
    }
}
