//! Streams tensors of any origin into one safetensors file: each output tensor is read where its
//! bytes lie (a memory map where the origin has one), re-laid-out and cast in pieces of at most
//! [`PIECE`] bytes by this thread, and written by a writer thread, so reading and converting the
//! next tensors overlaps writing the previous ones. The pieces travel in buffers that circulate
//! between the two threads: memory stays at a few pieces plus the mapped input tensor, and every
//! piece reuses memory already touched.

use super::phases::{time, Phase};
use super::pieces::{fill_piece, pool, PIECE};
use crate::diffusers::st_write::{PendingTensor, StWriter};
use crate::keras::KerasFile;
use crate::mapping::op::{Op, Relayout};
use crate::progress::Progress;
use crate::tensor::{BytesFn, DType, TensorSource};
use anyhow::{ensure, Context, Result};

/// Where input tensors come from.
#[derive(Clone, Copy)]
pub enum Origin<'a> {
    /// A KerasCV `.h5` file (HDF5 dataset paths).
    Keras(&'a KerasFile),
    /// A safetensors file, a view of one, a checkpoint.
    Tensors(&'a dyn TensorSource),
}

impl Origin<'_> {
    fn with_bytes(&self, key: &str, f: &mut BytesFn<'_>) -> Result<()> {
        match self {
            Origin::Keras(file) => file.with_bytes(key, f)?,
            Origin::Tensors(source) => source.with_bytes(key, f),
        }
    }

    /// How messages name `key`: its file and tensor.
    pub fn describe(&self, key: &str) -> String {
        match self {
            Origin::Keras(file) => format!("{}: tensor `{key}`", file.path.display()),
            Origin::Tensors(source) => format!("{}: tensor {}", source.origin().display(), source.describe(key)),
        }
    }
}

/// One input tensor of an output tensor.
#[derive(Clone)]
pub struct Part<'a> {
    pub origin: Origin<'a>,
    pub key: String,
    /// The table's layout change from KerasCV to diffusers, or none (bytes as they are).
    pub op: Option<Op>,
    /// The number of values the part must hold.
    pub elements: usize,
    /// The shape the op reads the source as, where it is not the stored one (a per-head
    /// attention kernel read as the Dense kernel it is).
    pub view: Option<Vec<usize>>,
    /// Only these rows (of the re-laid-out tensor's first axis), in this order, each row
    /// `.1` values long: one of q/k/v fused in one tensor, or swapped halves.
    pub rows: Option<(Vec<std::ops::Range<usize>>, usize)>,
}

impl<'a> Part<'a> {
    /// All of the tensor at `key`, re-laid-out by `op`.
    pub fn whole(origin: Origin<'a>, key: impl Into<String>, op: Option<Op>, elements: usize) -> Part<'a> {
        Part { origin, key: key.into(), op, elements, view: None, rows: None }
    }
}

/// One output tensor: its header entry, and the inputs whose bytes, in order, make it (several
/// for a tensor fused along its first axis).
pub struct Output<'a> {
    pub tensor: PendingTensor,
    pub parts: Vec<Part<'a>>,
}

/// The bytes all of `outputs` take in the file.
pub fn total_bytes(outputs: &[Output]) -> u64 {
    outputs.iter().map(|o| (o.tensor.shape.iter().product::<usize>() * o.tensor.dtype.size()) as u64).sum()
}

/// Writes every output, in order, through `writer` (announced with the same tensors in the
/// same order) and finishes the file.
pub fn write_outputs(mut writer: StWriter, outputs: &[Output], progress: &Progress) -> Result<()> {
    let (send, receive) = std::sync::mpsc::sync_channel::<(usize, bool, Vec<u8>)>(1);
    let (give_back, take) = pool();
    let announced: Vec<&PendingTensor> = outputs.iter().map(|o| &o.tensor).collect();
    let announced = &announced;
    std::thread::scope(|scope| -> Result<()> {
        let written = scope.spawn(move || -> Result<StWriter> {
            for (index, first, data) in receive {
                let t = announced[index];
                time(Phase::Write, data.len(), || -> Result<()> {
                    if first {
                        writer.begin_next(&t.key, t.dtype, &t.shape)?;
                    }
                    writer.write_part(&t.key, &data)
                })?;
                progress.advance(&t.key, data.len() as u64);
                let _ = give_back.send(data);
            }
            Ok(writer)
        });
        // Sends output `index` piece by piece; false once the writer has stopped (its error is
        // the one to report).
        let produced = (|| -> Result<()> {
            let mut scratch = Vec::new();
            for (index, output) in outputs.iter().enumerate() {
                let to = output.tensor.dtype;
                let mut first = true;
                let mut open = true;
                for part in &output.parts {
                    let mut send_part = |from: DType, shape: &[usize], data: &[u8]| -> Result<()> {
                        let n: usize = shape.iter().product();
                        ensure!(n == part.elements, "holds {n} values ({shape:?}) where {} are needed", part.elements);
                        let shape = part.view.as_deref().unwrap_or(shape);
                        let relayout = match part.op {
                            Some(op) => Relayout::new(op, true, data, shape, from.size())?,
                            None => Relayout::Same,
                        };
                        let mut emit = |len: usize, fill: &dyn Fn(&mut [u8])| -> Result<()> {
                            let Ok(mut out) = take.recv() else {
                                open = false;
                                return Ok(());
                            };
                            if open {
                                fill_piece(from, to, len, fill, &mut out, &mut scratch);
                                open = send.send((index, first, out)).is_ok();
                                first = false;
                            }
                            Ok(())
                        };
                        match &part.rows {
                            None => relayout.pieces(data, from.size(), PIECE, &mut emit),
                            Some((runs, row)) => runs.iter().try_for_each(|run| relayout.row_pieces(data, from.size(), PIECE, run.clone(), *row, &mut emit)),
                        }
                    };
                    part.origin.with_bytes(&part.key, &mut send_part).with_context(|| part.origin.describe(&part.key))?;
                    if !open {
                        return Ok(());
                    }
                }
                if first && send.send((index, true, Vec::new())).is_err() {
                    return Ok(()); // a tensor without elements, and the writer has stopped
                }
            }
            Ok(())
        })();
        drop(send);
        let writer = written.join().expect("the writer thread panicked");
        produced?;
        writer?.finish()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusers::st_read::StFile;
    use crate::tensor::RawTensor;

    fn st_file(path: &std::path::Path, tensors: &[(&str, RawTensor)]) -> StFile {
        let pending: Vec<PendingTensor> = tensors.iter().map(|(k, t)| PendingTensor { key: k.to_string(), dtype: t.dtype, shape: t.shape.clone() }).collect();
        let mut w = StWriter::create(path, pending).unwrap();
        for (k, t) in tensors {
            w.write_next(k, t).unwrap();
        }
        w.finish().unwrap();
        StFile::open(path).unwrap()
    }

    fn f32s(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
        values.into_iter().flat_map(f32::to_le_bytes).collect()
    }

    #[test]
    fn fused_parts_are_concatenated_and_cast_and_empty_tensors_kept() {
        let dir = tempfile::tempdir().unwrap();
        let big = (1usize << 22) + 3; // more than one piece
        let source = st_file(
            &dir.path().join("in.safetensors"),
            &[
                ("a", RawTensor { dtype: DType::F32, shape: vec![2, 3], data: f32s((0..6).map(|v| v as f32)) }),
                ("b", RawTensor { dtype: DType::F32, shape: vec![1, 3], data: f32s([6.0, 7.0, 8.0]) }),
                ("big", RawTensor { dtype: DType::F32, shape: vec![big], data: f32s((0..big).map(|v| (v % 1000) as f32 * 0.5)) }),
                ("none", RawTensor { dtype: DType::F32, shape: vec![0, 4], data: vec![] }),
            ],
        );
        let part = |key: &str, elements| Part::whole(Origin::Tensors(&source), key, None, elements);
        let outputs = vec![
            Output { tensor: PendingTensor { key: "ab".into(), dtype: DType::F16, shape: vec![3, 3] }, parts: vec![part("a", 6), part("b", 3)] },
            Output { tensor: PendingTensor { key: "big".into(), dtype: DType::F32, shape: vec![big] }, parts: vec![part("big", big)] },
            Output { tensor: PendingTensor { key: "none".into(), dtype: DType::F32, shape: vec![0, 4] }, parts: vec![part("none", 0)] },
        ];
        let out = dir.path().join("out.safetensors");
        let pending = outputs.iter().map(|o| o.tensor.clone()).collect();
        let progress = Progress::new("test", total_bytes(&outputs));
        write_outputs(StWriter::create(&out, pending).unwrap(), &outputs, &progress).unwrap();
        let back = StFile::open(&out).unwrap();
        assert_eq!(back.read("ab").unwrap().to_f32_values(), (0..9).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(back.read("big").unwrap(), source.read("big").unwrap());
        assert_eq!(back.read("none").unwrap().shape, vec![0, 4]);
    }

    #[test]
    fn a_part_of_the_wrong_size_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.safetensors");
        let source = st_file(&path, &[("a", RawTensor { dtype: DType::F32, shape: vec![2], data: f32s([1.0, 2.0]) })]);
        let outputs = vec![Output {
            tensor: PendingTensor { key: "a".into(), dtype: DType::F32, shape: vec![3] },
            parts: vec![Part::whole(Origin::Tensors(&source), "a", None, 3)],
        }];
        let out = dir.path().join("out.safetensors");
        let progress = Progress::new("test", 12);
        let err = write_outputs(StWriter::create(&out, vec![outputs[0].tensor.clone()]).unwrap(), &outputs, &progress).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("in.safetensors: tensor `a`") && text.contains("holds 2 values"), "{text}");
    }
}
