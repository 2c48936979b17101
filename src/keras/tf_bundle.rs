//! TensorFlow's tensor bundle, the format of TF checkpoints (`ckpt.index` + `ckpt.data-*`) and of a
//! SavedModel's `variables/variables.*`: an index table (LevelDB's SSTable layout: prefix-compressed
//! blocks, a block index, a fixed footer) mapping each tensor name to a `BundleEntryProto` (dtype,
//! shape, shard, offset, size, masked CRC-32C), and raw little-endian data shards. Read streaming
//! (data shards are memory-mapped, one tensor copied at a time); every stored checksum is checked.

use crate::tensor::{DType, RawTensor};
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// LevelDB's table magic, the last 8 bytes of an index file.
const TABLE_MAGIC: u64 = 0xdb4775248b80fb57;

#[derive(Clone, PartialEq, prost::Message)]
struct BundleHeaderProto {
    #[prost(int32, tag = "1")]
    num_shards: i32,
    /// 0 little-endian, 1 big-endian.
    #[prost(int32, tag = "2")]
    endianness: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Dim {
    #[prost(int64, tag = "1")]
    size: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorShapeProto {
    #[prost(message, repeated, tag = "2")]
    dim: Vec<Dim>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct BundleEntryProto {
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<TensorShapeProto>,
    #[prost(int32, tag = "3")]
    shard_id: i32,
    #[prost(int64, tag = "4")]
    offset: i64,
    #[prost(int64, tag = "5")]
    size: i64,
    #[prost(fixed32, tag = "6")]
    crc32c: u32,
    /// Partitioned variables: a slice per stored part (not read).
    #[prost(bytes = "vec", repeated, tag = "7")]
    slices: Vec<Vec<u8>>,
}

/// TensorFlow `DataType` values the bundle may hold.
const DT_FLOAT: i32 = 1;
const DT_STRING: i32 = 7;
const DT_BFLOAT16: i32 = 14;
const DT_HALF: i32 = 19;

/// One tensor's entry.
#[derive(Clone, Debug)]
pub struct BundleEntry {
    pub dtype: i32,
    pub shape: Vec<usize>,
    shard: usize,
    offset: usize,
    size: usize,
    crc32c: u32,
}

pub struct TfBundle {
    /// The path prefix (`…/variables/variables`, `…/ckpt-5`).
    pub prefix: PathBuf,
    pub entries: BTreeMap<String, BundleEntry>,
    shards: Vec<memmap2::Mmap>,
}

/// CRC-32C as LevelDB and TensorFlow store it (rotated and offset, so a CRC of data holding CRCs
/// is not trivially zero).
pub fn mask(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282ead8)
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).context("truncated varint")?;
        *pos += 1;
        value |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    bail!("varint longer than 10 bytes")
}

/// A block's bytes, its trailer (compression type, masked CRC-32C of block + type) checked.
fn block<'a>(file: &'a [u8], handle: &[u8]) -> Result<&'a [u8]> {
    let mut pos = 0;
    let (offset, size) = (varint(handle, &mut pos)? as usize, varint(handle, &mut pos)? as usize);
    ensure!(offset + size + 5 <= file.len(), "a block at byte {offset} runs past the end of the index (truncated?)");
    let (data, kind) = (&file[offset..offset + size], file[offset + size]);
    let stored = u32::from_le_bytes(file[offset + size + 1..offset + size + 5].try_into().unwrap());
    let crc = crc32c::crc32c_append(crc32c::crc32c(data), &[kind]);
    ensure!(mask(crc) == stored, "index block at byte {offset}: checksum mismatch (corrupted?)");
    ensure!(kind == 0, "index block at byte {offset} is compressed (type {kind}); TensorFlow writes bundles uncompressed");
    Ok(data)
}

/// The (key, value) entries of one block, prefix compression undone.
fn block_entries(data: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    ensure!(data.len() >= 4, "index block too short");
    let restarts = u32::from_le_bytes(data[data.len() - 4..].try_into().unwrap()) as usize;
    let end = data.len().checked_sub(4 + 4 * restarts).context("index block: bad restart count")?;
    let (mut pos, mut key, mut out) = (0usize, Vec::new(), Vec::new());
    while pos < end {
        let shared = varint(data, &mut pos)? as usize;
        let unshared = varint(data, &mut pos)? as usize;
        let value_len = varint(data, &mut pos)? as usize;
        ensure!(shared <= key.len() && pos + unshared + value_len <= end, "index block: malformed entry");
        key.truncate(shared);
        key.extend_from_slice(&data[pos..pos + unshared]);
        pos += unshared;
        out.push((key.clone(), data[pos..pos + value_len].to_vec()));
        pos += value_len;
    }
    Ok(out)
}

/// Every (key, value) of a LevelDB-format table.
pub fn read_table(file: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    ensure!(file.len() >= 48, "the index is {} bytes, shorter than a table footer (truncated?)", file.len());
    let footer = &file[file.len() - 48..];
    ensure!(u64::from_le_bytes(footer[40..].try_into().unwrap()) == TABLE_MAGIC, "not a TensorFlow index table (bad magic; truncated?)");
    let mut pos = 0;
    let _metaindex = (varint(footer, &mut pos)?, varint(footer, &mut pos)?);
    let index = block(file, &footer[pos..])?;
    let mut out = Vec::new();
    for (_, handle) in block_entries(index)? {
        out.extend(block_entries(block(file, &handle)?)?);
    }
    Ok(out)
}

impl TfBundle {
    /// Opens `<prefix>.index` and its data shards.
    pub fn open(prefix: &Path) -> Result<TfBundle> {
        let index_path = PathBuf::from(format!("{}.index", prefix.display()));
        let bytes = std::fs::read(&index_path).with_context(|| format!("{}: cannot read", index_path.display()))?;
        let table = read_table(&bytes).with_context(|| index_path.display().to_string())?;
        let mut header = None;
        let mut entries = BTreeMap::new();
        for (key, value) in table {
            if key.is_empty() {
                header = Some(<BundleHeaderProto as prost::Message>::decode(&value[..]).context("bundle header")?);
                continue;
            }
            let name = String::from_utf8(key).context("a tensor name is not UTF-8")?;
            let e = <BundleEntryProto as prost::Message>::decode(&value[..]).with_context(|| format!("tensor `{name}`: bad entry"))?;
            ensure!(e.slices.is_empty(), "tensor `{name}` is a partitioned variable (slices), which is not read");
            let shape = e.shape.unwrap_or_default().dim.iter().map(|d| usize::try_from(d.size)).collect::<Result<Vec<_>, _>>()?;
            entries.insert(
                name,
                BundleEntry { dtype: e.dtype, shape, shard: e.shard_id as usize, offset: e.offset as usize, size: e.size as usize, crc32c: e.crc32c },
            );
        }
        let header = header.with_context(|| format!("{}: no bundle header (not a TensorFlow checkpoint index)", index_path.display()))?;
        ensure!(header.endianness == 0, "{}: a big-endian bundle is not read", index_path.display());
        let n = header.num_shards.max(1) as usize;
        let shards = (0..n)
            .map(|i| {
                let path = PathBuf::from(format!("{}.data-{i:05}-of-{n:05}", prefix.display()));
                let file = std::fs::File::open(&path).with_context(|| format!("{}: missing data shard", path.display()))?;
                // SAFETY: read-only map of a file not modified while dreambridge runs.
                unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let bundle = TfBundle { prefix: prefix.to_owned(), entries, shards };
        for (name, e) in &bundle.entries {
            let len = bundle.shards.get(e.shard).map_or(0, |s| s.len());
            ensure!(
                e.offset + e.size <= len,
                "tensor `{name}`: its {} bytes at {} run past the end of data shard {} ({len} bytes; truncated?)",
                e.size,
                e.offset,
                e.shard
            );
        }
        Ok(bundle)
    }

    fn bytes(&self, name: &str) -> Result<(&BundleEntry, &[u8])> {
        let e = self.entries.get(name).with_context(|| format!("tensor `{name}`: not found"))?;
        Ok((e, &self.shards[e.shard][e.offset..e.offset + e.size]))
    }

    /// The element type of a float tensor.
    pub fn dtype(&self, name: &str) -> Result<DType> {
        let e = self.entries.get(name).with_context(|| format!("tensor `{name}`: not found"))?;
        Ok(match e.dtype {
            DT_FLOAT => DType::F32,
            DT_HALF => DType::F16,
            DT_BFLOAT16 => DType::BF16,
            other => bail!("tensor `{name}`: unsupported TensorFlow dtype {other} (expected float32, float16 or bfloat16)"),
        })
    }

    /// A float tensor's bytes, checksum verified.
    pub fn read(&self, name: &str) -> Result<RawTensor> {
        let dtype = self.dtype(name)?;
        let (e, data) = self.bytes(name)?;
        let count: usize = e.shape.iter().product();
        // (Callers name the tensor.)
        ensure!(data.len() == count * dtype.size(), "{} bytes for shape {:?}", data.len(), e.shape);
        ensure!(mask(crc32c::crc32c(data)) == e.crc32c, "checksum mismatch (data shard {} is corrupted)", e.shard);
        Ok(RawTensor { dtype, shape: e.shape.clone(), data: data.to_vec() })
    }

    /// A scalar string tensor (the object graph), checksums verified.
    pub fn read_string(&self, name: &str) -> Result<Vec<u8>> {
        let (e, data) = self.bytes(name)?;
        ensure!(e.dtype == DT_STRING && e.shape.iter().product::<usize>() == 1, "tensor `{name}`: not a scalar string");
        let mut pos = 0;
        let len = varint(data, &mut pos)? as usize;
        ensure!(pos + 4 + len == data.len(), "tensor `{name}`: string lengths do not add up");
        let mut crc = if len <= u32::MAX as usize {
            crc32c::crc32c(&(len as u32).to_le_bytes())
        } else {
            crc32c::crc32c(&(len as u64).to_le_bytes())
        };
        let stored_lengths = &data[pos..pos + 4];
        ensure!(mask(crc).to_le_bytes() == stored_lengths, "tensor `{name}`: length checksum mismatch (corrupted?)");
        crc = crc32c::crc32c_append(crc, stored_lengths);
        let bytes = &data[pos + 4..];
        crc = crc32c::crc32c_append(crc, bytes);
        ensure!(mask(crc) == e.crc32c, "tensor `{name}`: checksum mismatch (the data file is corrupted)");
        Ok(bytes.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_leveldb() {
        // LevelDB's crc32c_test: Mask(Value("foo")) round trip and known CRC-32C values.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe3069283);
        let crc = crc32c::crc32c(b"foo");
        assert_ne!(mask(crc), crc);
        assert_eq!(mask(crc).wrapping_sub(0xa282ead8).rotate_left(15), crc);
    }

    #[test]
    fn blocks_undo_prefix_compression() {
        // Entries "apple"->"1", "apricot"->"2" (shares "ap"), restart array [0], count 1.
        let mut b = vec![0, 5, 1];
        b.extend_from_slice(b"apple1");
        b.extend_from_slice(&[2, 5, 1]);
        b.extend_from_slice(b"ricot2");
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        let e = block_entries(&b).unwrap();
        assert_eq!(e, vec![(b"apple".to_vec(), b"1".to_vec()), (b"apricot".to_vec(), b"2".to_vec())]);
        assert!(read_table(&b).is_err());
    }
}
