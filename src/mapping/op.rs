//! How a tensor's array is laid out on each side, and the element permutations between them.
//! Permutations move raw elements (2 or 4 bytes), so conversions are bit-exact in both directions.

use anyhow::{bail, ensure, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Same layout on both sides (norms, biases, embeddings).
    Copy,
    /// Keras Dense kernel `(in, out)` ⇄ torch Linear weight `(out, in)`.
    Dense,
    /// Keras Conv2D kernel `(kh, kw, in, out)` ⇄ torch Conv2d weight `(out, in, kh, kw)`.
    Conv,
    /// Keras 1×1 Conv2D kernel `(1, 1, in, out)` ⇄ torch Linear weight `(out, in)`.
    Conv1x1Linear,
}

impl std::str::FromStr for Op {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Op> {
        Ok(match s {
            "copy" => Op::Copy,
            "dense" => Op::Dense,
            "conv" => Op::Conv,
            "conv1x1_linear" => Op::Conv1x1Linear,
            other => bail!("unknown op `{other}` (copy, dense, conv, conv1x1_linear)"),
        })
    }
}

impl Op {
    /// The Keras shape of a tensor whose diffusers shape is `d`.
    pub fn keras_shape(self, d: &[usize]) -> Vec<usize> {
        match (self, d) {
            (Op::Dense, [o, i]) => vec![*i, *o],
            (Op::Conv, [o, i, kh, kw]) => vec![*kh, *kw, *i, *o],
            (Op::Conv1x1Linear, [o, i]) => vec![1, 1, *i, *o],
            _ => d.to_vec(),
        }
    }

    /// Keras-layout bytes (shape `keras_shape`) to diffusers-layout bytes.
    pub fn to_diffusers(self, data: Vec<u8>, keras_shape: &[usize], elem: usize) -> Result<Vec<u8>> {
        if self == Op::Copy {
            return Ok(data);
        }
        let mut out = Vec::new();
        self.to_diffusers_into(&data, keras_shape, elem, &mut out)?;
        Ok(out)
    }

    /// As [`Op::to_diffusers`], into `out` (its memory reused, see [`crate::tensor::reuse`]).
    pub fn to_diffusers_into(self, data: &[u8], keras_shape: &[usize], elem: usize, out: &mut Vec<u8>) -> Result<()> {
        self.change_into(true, data, keras_shape, elem, out)
    }

    /// Diffusers-layout bytes (shape `diffusers_shape`) to Keras-layout bytes.
    pub fn to_keras(self, data: Vec<u8>, diffusers_shape: &[usize], elem: usize) -> Result<Vec<u8>> {
        if self == Op::Copy {
            return Ok(data);
        }
        let mut out = Vec::new();
        self.to_keras_into(&data, diffusers_shape, elem, &mut out)?;
        Ok(out)
    }

    /// As [`Op::to_keras`], into `out` (its memory reused).
    pub fn to_keras_into(self, data: &[u8], diffusers_shape: &[usize], elem: usize, out: &mut Vec<u8>) -> Result<()> {
        self.change_into(false, data, diffusers_shape, elem, out)
    }

    fn change_into(self, to_diffusers: bool, data: &[u8], shape: &[usize], elem: usize, out: &mut Vec<u8>) -> Result<()> {
        match self.step(to_diffusers, shape)? {
            Step::Same => crate::tensor::reuse(out, data.len()).copy_from_slice(data),
            Step::Transposed(t) => t.run(data, elem, out)?,
            Step::Permute(perm) => *out = permute(data, shape, perm, elem)?,
        }
        Ok(())
    }

    /// The one table of layout changes: which transpose takes `shape` to diffusers' layout
    /// (`to_diffusers`) or back to Keras'; shapes outside the tables get a plain permutation.
    fn step(self, to_diffusers: bool, shape: &[usize]) -> Result<Step> {
        let t = |rows, cols, in_row, out_row, batch, in_batch, out_batch| Step::Transposed(Transpose { rows, cols, in_row, out_row, batch, in_batch, out_batch });
        Ok(match (self, to_diffusers, shape) {
            (Op::Copy, _, _) => Step::Same,
            // [in, out] -> [out, in]
            (Op::Dense, true, &[i, o]) | (Op::Conv1x1Linear, true, &[1, 1, i, o]) => t(i, o, o, i, 1, 0, 0),
            // [kh·kw, in, out] -> [out, in, kh·kw]: per input channel, a (kh·kw) x out transpose.
            (Op::Conv, true, &[kh, kw, i, o]) => t(kh * kw, o, i * o, i * kh * kw, i, o, kh * kw),
            (Op::Conv1x1Linear, true, _) => bail!("expected a 1x1 kernel, got {shape:?}"),
            (Op::Dense, true, _) => Step::Permute(&[1, 0]),
            (Op::Conv, true, _) => Step::Permute(&[3, 2, 0, 1]),
            // [out, in] -> [in, out]
            (Op::Dense | Op::Conv1x1Linear, false, &[o, i]) => t(o, i, i, o, 1, 0, 0),
            // [out, in, kh·kw] -> [kh·kw, in, out]: per input channel, an out x (kh·kw) transpose.
            (Op::Conv, false, &[o, i, kh, kw]) => t(o, kh * kw, i * kh * kw, i * o, i, kh * kw, o),
            (Op::Dense | Op::Conv1x1Linear, false, _) => Step::Permute(&[1, 0]),
            (Op::Conv, false, _) => Step::Permute(&[2, 3, 1, 0]),
        })
    }
}

/// One layout change, as [`Op::step`] finds it.
enum Step {
    Same,
    Transposed(Transpose),
    Permute(&'static [usize]),
}

/// A tensor's layout change as slabs of whole output rows (the outermost output axis), so a
/// large tensor can be produced and written a few megabytes at a time.
pub enum Relayout {
    /// The bytes as they are.
    Same,
    /// One of the tables' transposes.
    Transposed(Transpose),
    /// Any other shape: the whole tensor at once, already permuted.
    Whole(Vec<u8>),
}

impl Relayout {
    /// How `op` changes `data` (of `shape`, in `elem`-byte elements) to diffusers' layout
    /// (`to_diffusers`) or back to Keras' (`!to_diffusers`).
    pub fn new(op: Op, to_diffusers: bool, data: &[u8], shape: &[usize], elem: usize) -> Result<Relayout> {
        match op.step(to_diffusers, shape)? {
            Step::Same => Ok(Relayout::Same),
            Step::Permute(perm) => Ok(Relayout::Whole(permute(data, shape, perm, elem)?)),
            Step::Transposed(plan) => {
                let n = plan.rows * plan.cols * plan.batch;
                ensure!(data.len() == n * elem, "{} bytes do not hold {n} {elem}-byte elements", data.len());
                ensure!(matches!(elem, 2 | 4), "unsupported element size {elem}");
                Ok(Relayout::Transposed(plan))
            }
        }
    }

    /// The output in pieces of at most `max_bytes` (at least one output row each), in order:
    /// `emit(piece_len, fill)` is called per piece, and `fill(out)` writes that piece into `out`.
    pub fn pieces(&self, data: &[u8], elem: usize, max_bytes: usize, mut emit: impl FnMut(usize, &dyn Fn(&mut [u8])) -> Result<()>) -> Result<()> {
        match self {
            Relayout::Same => {
                for chunk in data.chunks(max_bytes.max(1)) {
                    emit(chunk.len(), &|out: &mut [u8]| out.copy_from_slice(chunk))?;
                }
                Ok(())
            }
            Relayout::Whole(all) => emit(all.len(), &|out: &mut [u8]| out.copy_from_slice(all)),
            Relayout::Transposed(t) => {
                let row_bytes = t.out_row * elem;
                let step = (max_bytes / row_bytes.max(1)).max(1);
                for c0 in (0..t.cols).step_by(step) {
                    let c1 = (c0 + step).min(t.cols);
                    emit((c1 - c0) * row_bytes, &|out: &mut [u8]| match elem {
                        2 => t.tiles::<2>(data, out, c0, c1),
                        _ => t.tiles::<4>(data, out, c0, c1),
                    })?;
                }
                Ok(())
            }
        }
    }
}

impl Relayout {
    /// As [`Relayout::pieces`], for output rows `rows` only (rows of `row` values each).
    pub fn row_pieces(&self, data: &[u8], elem: usize, max_bytes: usize, rows: std::ops::Range<usize>, row: usize, mut emit: impl FnMut(usize, &dyn Fn(&mut [u8])) -> Result<()>) -> Result<()> {
        let bytes = |all: &[u8]| -> Result<std::ops::Range<usize>> {
            let range = rows.start * row * elem..rows.end * row * elem;
            ensure!(range.end <= all.len(), "rows {rows:?} of {row} values lie beyond the tensor's {} bytes", all.len());
            Ok(range)
        };
        match self {
            Relayout::Same => {
                let range = bytes(data)?;
                for chunk in data[range].chunks(max_bytes.max(1)) {
                    emit(chunk.len(), &|out: &mut [u8]| out.copy_from_slice(chunk))?;
                }
                Ok(())
            }
            Relayout::Whole(all) => {
                let range = bytes(all)?;
                emit(range.len(), &|out: &mut [u8]| out.copy_from_slice(&all[range.clone()]))
            }
            Relayout::Transposed(t) => {
                ensure!(rows.end <= t.cols && t.out_row == row, "rows {rows:?} of {row} values do not fit a {}x{} transpose", t.cols, t.out_row);
                let row_bytes = t.out_row * elem;
                let step = (max_bytes / row_bytes.max(1)).max(1);
                for c0 in rows.clone().step_by(step) {
                    let c1 = (c0 + step).min(rows.end);
                    emit((c1 - c0) * row_bytes, &|out: &mut [u8]| match elem {
                        2 => t.tiles::<2>(data, out, c0, c1),
                        _ => t.tiles::<4>(data, out, c0, c1),
                    })?;
                }
                Ok(())
            }
        }
    }
}

/// Receives a placed piece: its runs (output byte offset, length), its length, and its filler.
pub type PlacedEmit<'a> = dyn FnMut(&[(usize, usize)], usize, &dyn Fn(&mut [u8])) -> Result<()> + 'a;

impl Relayout {
    /// As [`Relayout::pieces`] for a writer that can place bytes anywhere in the output:
    /// `emit(runs, len, fill)` also gets the runs (output byte offset, length) that the piece's
    /// bytes fill, in order. A transpose with few output rows (Keras' conv kernels, `kh·kw` rows)
    /// is cut across its batch instead of its rows, so each piece reads its input once.
    pub fn placed_pieces(&self, data: &[u8], elem: usize, max_bytes: usize, mut emit: impl FnMut(&[(usize, usize)], usize, &dyn Fn(&mut [u8])) -> Result<()>) -> Result<()> {
        let t = match self {
            Relayout::Transposed(t) if t.batch > 1 && t.cols < 64 && t.out_batch * t.batch == t.out_row => t,
            _ => {
                let mut at = 0;
                return self.pieces(data, elem, max_bytes, |len, fill| {
                    emit(&[(at, len)], len, fill)?;
                    at += len;
                    Ok(())
                });
            }
        };
        let step = (max_bytes / (t.cols * t.out_batch * elem).max(1)).max(1);
        for b0 in (0..t.batch).step_by(step) {
            let nb = (b0 + step).min(t.batch) - b0;
            let run = nb * t.out_batch * elem;
            let runs: Vec<(usize, usize)> = (0..t.cols).map(|c| ((c * t.out_row + b0 * t.out_batch) * elem, run)).collect();
            let part = Transpose { out_row: nb * t.out_batch, batch: nb, ..*t };
            let src = &data[b0 * t.in_batch * elem..];
            emit(&runs, run * t.cols, &|out: &mut [u8]| match elem {
                2 => part.tiles::<2>(src, out, 0, part.cols),
                _ => part.tiles::<4>(src, out, 0, part.cols),
            })?;
        }
        Ok(())
    }
}

/// A batch of strided 2-D transposes, in elements: for every `b < batch`, `r < rows`,
/// `c < cols`, `out[b·out_batch + c·out_row + r] = in[b·in_batch + r·in_row + c]`. Every layout
/// change of the tables is one of these; done in square tiles so that both sides stay in cache
/// (a plain strided walk misses the cache on every element of the strided side).
#[derive(Clone, Copy)]
pub struct Transpose {
    rows: usize,
    cols: usize,
    in_row: usize,
    out_row: usize,
    batch: usize,
    in_batch: usize,
    out_batch: usize,
}

impl Transpose {
    /// Every output element is written, so `out`'s reused memory needs no clearing.
    fn run(&self, data: &[u8], elem: usize, out: &mut Vec<u8>) -> Result<()> {
        let n = self.rows * self.cols * self.batch;
        ensure!(data.len() == n * elem, "{} bytes do not hold {n} {elem}-byte elements", data.len());
        let out = crate::tensor::reuse(out, data.len());
        match elem {
            2 => self.tiles::<2>(data, out, 0, self.cols),
            4 => self.tiles::<4>(data, out, 0, self.cols),
            _ => bail!("unsupported element size {elem}"),
        }
        Ok(())
    }

    /// Output columns `c0..c1` (every table's outermost output axis, `out_row` elements each)
    /// into `dst`, which holds exactly those.
    fn tiles<const E: usize>(&self, src: &[u8], dst: &mut [u8], c0: usize, c1: usize) {
        const TILE: usize = 32;
        if self.rows == 0 || c1 <= c0 || self.batch == 0 {
            return;
        }
        let base = c0 * self.out_row;
        // Every index below is at most these, checked once so the loop can skip the checks.
        let last_in = (self.batch - 1) * self.in_batch + (self.rows - 1) * self.in_row + (c1 - 1);
        let last_out = (self.batch - 1) * self.out_batch + (c1 - 1) * self.out_row - base + (self.rows - 1);
        assert!((last_in + 1) * E <= src.len() && (last_out + 1) * E <= dst.len(), "transpose out of bounds");
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for b in 0..self.batch {
            let (ib, ob) = (b * self.in_batch, b * self.out_batch);
            for r0 in (0..self.rows).step_by(TILE) {
                let r1 = (r0 + TILE).min(self.rows);
                for ct in (c0..c1).step_by(TILE) {
                    for c in ct..(ct + TILE).min(c1) {
                        let o = ob + c * self.out_row - base;
                        for r in r0..r1 {
                            let i = ib + r * self.in_row + c;
                            // SAFETY: i <= last_in and o + r <= last_out, both checked above.
                            unsafe { std::ptr::copy_nonoverlapping(s.add(i * E), d.add((o + r) * E), E) };
                        }
                    }
                }
            }
        }
    }
}

/// Row-major permutation of an array of `elem`-byte elements: output axis k = input axis perm[k].
/// Walks the output in order and reads the input by strides, moving whole elements.
pub fn permute(data: &[u8], shape: &[usize], perm: &[usize], elem: usize) -> Result<Vec<u8>> {
    let count: usize = shape.iter().product();
    ensure!(data.len() == count * elem, "{} bytes do not hold shape {shape:?} of {elem}-byte elements", data.len());
    ensure!(perm.len() == shape.len() && !shape.is_empty(), "permutation {perm:?} does not fit shape {shape:?}");
    match elem {
        2 => Ok(permute_elems::<2>(data, shape, perm)),
        4 => Ok(permute_elems::<4>(data, shape, perm)),
        _ => bail!("unsupported element size {elem}"),
    }
}

fn permute_elems<const E: usize>(data: &[u8], shape: &[usize], perm: &[usize]) -> Vec<u8> {
    let mut in_strides = vec![1usize; shape.len()];
    for d in (0..shape.len() - 1).rev() {
        in_strides[d] = in_strides[d + 1] * shape[d + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let (last, inner_stride) = (out_shape.len() - 1, strides[strides.len() - 1]);
    let mut out = vec![0u8; data.len()];
    let mut index = vec![0usize; out_shape.len()]; // odometer over the outer output axes
    let mut base = 0usize; // input element offset of the current output row
    for row in out.chunks_exact_mut(out_shape[last] * E) {
        let mut src = base;
        for dst in row.chunks_exact_mut(E) {
            dst.copy_from_slice(&data[src * E..src * E + E]);
            src += inner_stride;
        }
        for d in (0..last).rev() {
            index[d] += 1;
            base += strides[d];
            if index[d] < out_shape[d] {
                break;
            }
            base -= strides[d] * out_shape[d];
            index[d] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn tiled_transposes_equal_the_plain_permutation() {
        for (kh, kw, i, o) in [(3, 3, 37, 70), (1, 1, 33, 65), (3, 3, 1, 1), (2, 1, 64, 31)] {
            for elem in [2, 4] {
                let n = kh * kw * i * o * elem;
                let data: Vec<u8> = (0..n).map(|v| (v * 7 % 251) as u8).collect();
                let conv = Op::Conv.to_diffusers(data.clone(), &[kh, kw, i, o], elem).unwrap();
                assert_eq!(conv, permute(&data, &[kh, kw, i, o], &[3, 2, 0, 1], elem).unwrap());
                assert_eq!(Op::Conv.to_keras(conv.clone(), &[o, i, kh, kw], elem).unwrap(), data);
                let dense = Op::Dense.to_diffusers(data.clone(), &[kh * kw * i, o], elem).unwrap();
                assert_eq!(dense, permute(&data, &[kh * kw * i, o], &[1, 0], elem).unwrap());
                assert_eq!(Op::Dense.to_keras(dense, &[o, kh * kw * i], elem).unwrap(), data);
                if (kh, kw) == (1, 1) {
                    assert_eq!(Op::Conv1x1Linear.to_diffusers(data.clone(), &[1, 1, i, o], elem).unwrap(), permute(&data, &[i, o], &[1, 0], elem).unwrap());
                }
            }
        }
    }

    #[test]
    fn pieces_join_to_the_whole_layout_change() {
        for (kh, kw, i, o) in [(3, 3, 37, 70), (1, 1, 33, 65), (2, 1, 64, 31)] {
            for elem in [2, 4] {
                let data: Vec<u8> = (0..kh * kw * i * o * elem).map(|v| (v * 13 % 251) as u8).collect();
                for (op, to_diffusers, shape) in [
                    (Op::Conv, true, vec![kh, kw, i, o]),
                    (Op::Conv, false, vec![o, i, kh, kw]),
                    (Op::Dense, true, vec![kh * kw * i, o]),
                    (Op::Dense, false, vec![o, kh * kw * i]),
                    (Op::Copy, true, vec![data.len() / elem]),
                ] {
                    let whole = if to_diffusers { op.to_diffusers(data.clone(), &shape, elem) } else { op.to_keras(data.clone(), &shape, elem) }.unwrap();
                    for max in [1, 100, 4096, 40_000, usize::MAX] {
                        let (mut joined, mut sizes) = (Vec::new(), Vec::new());
                        Relayout::new(op, to_diffusers, &data, &shape, elem)
                            .unwrap()
                            .pieces(&data, elem, max, |len, fill| {
                                let mut piece = vec![0u8; len];
                                fill(&mut piece);
                                joined.extend(piece);
                                sizes.push(len);
                                Ok(())
                            })
                            .unwrap();
                        assert_eq!(joined, whole, "{op:?} {shape:?} max {max}");
                        // A piece is one output row at least (at most 9·37·2 or 37·70 elements here).
                        assert!(sizes.iter().all(|&s| s <= max.max(37 * 70 * elem)), "{sizes:?}");
                        assert!(max < whole.len() || sizes.len() == 1);
                        let mut placed = vec![0u8; whole.len()];
                        Relayout::new(op, to_diffusers, &data, &shape, elem)
                            .unwrap()
                            .placed_pieces(&data, elem, max, |runs, len, fill| {
                                let mut piece = vec![0u8; len];
                                fill(&mut piece);
                                let mut from = 0;
                                for &(at, n) in runs {
                                    placed[at..at + n].copy_from_slice(&piece[from..from + n]);
                                    from += n;
                                }
                                assert_eq!(from, len);
                                Ok(())
                            })
                            .unwrap();
                        assert_eq!(placed, whole, "placed {op:?} {shape:?} max {max}");
                    }
                }
            }
        }
    }

    #[test]
    fn dense_transposes() {
        // Keras (in=2, out=3): row i holds the weights from input i.
        let keras = f32_bytes(&[1., 2., 3., 4., 5., 6.]);
        let torch = Op::Dense.to_diffusers(keras.clone(), &[2, 3], 4).unwrap();
        assert_eq!(torch, f32_bytes(&[1., 4., 2., 5., 3., 6.]));
        assert_eq!(Op::Dense.to_keras(torch, &[3, 2], 4).unwrap(), keras);
    }

    #[test]
    fn conv_permutes_and_inverts() {
        let shape = [3usize, 2, 4, 5]; // kh, kw, in, out
        let values: Vec<f32> = (0..120).map(|v| v as f32).collect();
        let keras = f32_bytes(&values);
        let torch = Op::Conv.to_diffusers(keras.clone(), &shape, 4).unwrap();
        // torch[o][i][y][x] == keras[y][x][i][o]
        let at = |o: usize, i: usize, y: usize, x: usize| {
            let idx = ((o * 4 + i) * 3 + y) * 2 + x;
            f32::from_le_bytes(torch[idx * 4..idx * 4 + 4].try_into().unwrap())
        };
        assert_eq!(at(4, 1, 2, 1), values[((2 * 2 + 1) * 4 + 1) * 5 + 4]);
        let d = Op::Conv.keras_shape(&[5, 4, 3, 2]);
        assert_eq!(d, shape);
        assert_eq!(Op::Conv.to_keras(torch.clone(), &[5, 4, 3, 2], 4).unwrap(), keras);
    }

    #[test]
    fn conv1x1_becomes_linear() {
        let keras = f32_bytes(&[1., 2., 3., 4., 5., 6.]); // (1,1,in=2,out=3)
        let torch = Op::Conv1x1Linear.to_diffusers(keras.clone(), &[1, 1, 2, 3], 4).unwrap();
        assert_eq!(torch, f32_bytes(&[1., 4., 2., 5., 3., 6.]));
        assert_eq!(Op::Conv1x1Linear.keras_shape(&[3, 2]), vec![1, 1, 2, 3]);
        assert_eq!(Op::Conv1x1Linear.to_keras(torch, &[3, 2], 4).unwrap(), keras);
        assert!(Op::Conv1x1Linear.to_diffusers(keras.clone(), &[2, 3], 4).is_err());
    }

    #[test]
    fn half_elements_move_whole() {
        let data: Vec<u8> = (0u8..12).collect(); // six 2-byte elements, shape (2,3)
        let out = permute(&data, &[2, 3], &[1, 0], 2).unwrap();
        assert_eq!(out, vec![0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]);
        assert!(permute(&data, &[2, 2], &[1, 0], 2).is_err());
    }

    #[test]
    fn permutation_matches_index_arithmetic_on_odd_shapes() {
        let shape = [2usize, 3, 5, 7];
        let perm = [3usize, 1, 0, 2];
        let data: Vec<u8> = (0..210u32).flat_map(|v| v.to_le_bytes()).collect();
        let out = permute(&data, &shape, &perm, 4).unwrap();
        let at = |i: usize| u32::from_le_bytes(out[i * 4..i * 4 + 4].try_into().unwrap());
        let mut i = 0;
        for d3 in 0..7 {
            for d1 in 0..3 {
                for d0 in 0..2 {
                    for d2 in 0..5 {
                        assert_eq!(at(i), (((d0 * 3 + d1) * 5 + d2) * 7 + d3) as u32);
                        i += 1;
                    }
                }
            }
        }
    }
}
