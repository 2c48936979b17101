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
        match (self, keras_shape) {
            (Op::Copy, _) => Ok(data),
            // [in, out] -> [out, in]
            (Op::Dense, &[i, o]) => Transpose { rows: i, cols: o, in_row: o, out_row: i, batch: 1, in_batch: 0, out_batch: 0 }.run(&data, elem),
            // [kh·kw, in, out] -> [out, in, kh·kw]: per input channel, a (kh·kw) x out transpose.
            (Op::Conv, &[kh, kw, i, o]) => Transpose { rows: kh * kw, cols: o, in_row: i * o, out_row: i * kh * kw, batch: i, in_batch: o, out_batch: kh * kw }.run(&data, elem),
            (Op::Conv1x1Linear, &[1, 1, i, o]) => Transpose { rows: i, cols: o, in_row: o, out_row: i, batch: 1, in_batch: 0, out_batch: 0 }.run(&data, elem),
            (Op::Conv1x1Linear, _) => bail!("expected a 1x1 kernel, got {keras_shape:?}"),
            (Op::Dense, _) => permute(&data, keras_shape, &[1, 0], elem),
            (Op::Conv, _) => permute(&data, keras_shape, &[3, 2, 0, 1], elem),
        }
    }

    /// Diffusers-layout bytes (shape `diffusers_shape`) to Keras-layout bytes.
    pub fn to_keras(self, data: Vec<u8>, diffusers_shape: &[usize], elem: usize) -> Result<Vec<u8>> {
        match (self, diffusers_shape) {
            (Op::Copy, _) => Ok(data),
            // [out, in] -> [in, out]
            (Op::Dense | Op::Conv1x1Linear, &[o, i]) => Transpose { rows: o, cols: i, in_row: i, out_row: o, batch: 1, in_batch: 0, out_batch: 0 }.run(&data, elem),
            // [out, in, kh·kw] -> [kh·kw, in, out]: per input channel, an out x (kh·kw) transpose.
            (Op::Conv, &[o, i, kh, kw]) => Transpose { rows: o, cols: kh * kw, in_row: i * kh * kw, out_row: i * o, batch: i, in_batch: kh * kw, out_batch: o }.run(&data, elem),
            (Op::Dense | Op::Conv1x1Linear, _) => permute(&data, diffusers_shape, &[1, 0], elem),
            (Op::Conv, _) => permute(&data, diffusers_shape, &[2, 3, 1, 0], elem),
        }
    }
}

/// A batch of strided 2-D transposes, in elements: for every `b < batch`, `r < rows`,
/// `c < cols`, `out[b·out_batch + c·out_row + r] = in[b·in_batch + r·in_row + c]`. Every layout
/// change of the tables is one of these; done in square tiles so that both sides stay in cache
/// (a plain strided walk misses the cache on every element of the strided side).
struct Transpose {
    rows: usize,
    cols: usize,
    in_row: usize,
    out_row: usize,
    batch: usize,
    in_batch: usize,
    out_batch: usize,
}

impl Transpose {
    fn run(&self, data: &[u8], elem: usize) -> Result<Vec<u8>> {
        let n = self.rows * self.cols * self.batch;
        ensure!(data.len() == n * elem, "{} bytes do not hold {n} {elem}-byte elements", data.len());
        let mut out = vec![0u8; data.len()];
        match elem {
            2 => self.tiles::<2>(data, &mut out),
            4 => self.tiles::<4>(data, &mut out),
            _ => bail!("unsupported element size {elem}"),
        }
        Ok(out)
    }

    fn tiles<const E: usize>(&self, src: &[u8], dst: &mut [u8]) {
        const TILE: usize = 32;
        for b in 0..self.batch {
            let (ib, ob) = (b * self.in_batch, b * self.out_batch);
            for r0 in (0..self.rows).step_by(TILE) {
                for c0 in (0..self.cols).step_by(TILE) {
                    for c in c0..(c0 + TILE).min(self.cols) {
                        let o = (ob + c * self.out_row) * E;
                        for r in r0..(r0 + TILE).min(self.rows) {
                            let i = (ib + r * self.in_row + c) * E;
                            dst[o + r * E..o + r * E + E].copy_from_slice(&src[i..i + E]);
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
