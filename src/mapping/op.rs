//! How a tensor's array is laid out on each side, and the element permutations between them.
//! Permutations move raw elements (2 or 4 bytes), so conversions are bit-exact in both directions.

use anyhow::{bail, ensure, Result};
use ndarray::{ArrayViewD, IxDyn};

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
    pub fn to_diffusers(self, data: &[u8], keras_shape: &[usize], elem: usize) -> Result<Vec<u8>> {
        match self {
            Op::Copy => Ok(data.to_vec()),
            Op::Dense => permute(data, keras_shape, &[1, 0], elem),
            Op::Conv => permute(data, keras_shape, &[3, 2, 0, 1], elem),
            Op::Conv1x1Linear => {
                ensure!(keras_shape.len() == 4 && keras_shape[..2] == [1, 1], "expected a 1x1 kernel, got {keras_shape:?}");
                permute(data, &keras_shape[2..], &[1, 0], elem)
            }
        }
    }

    /// Diffusers-layout bytes (shape `diffusers_shape`) to Keras-layout bytes.
    pub fn to_keras(self, data: &[u8], diffusers_shape: &[usize], elem: usize) -> Result<Vec<u8>> {
        match self {
            Op::Copy => Ok(data.to_vec()),
            Op::Dense | Op::Conv1x1Linear => permute(data, diffusers_shape, &[1, 0], elem),
            Op::Conv => permute(data, diffusers_shape, &[2, 3, 1, 0], elem),
        }
    }
}

/// Row-major permutation of an array of `elem`-byte elements: output axis k = input axis perm[k].
pub fn permute(data: &[u8], shape: &[usize], perm: &[usize], elem: usize) -> Result<Vec<u8>> {
    let count: usize = shape.iter().product();
    ensure!(data.len() == count * elem, "{} bytes do not hold shape {shape:?} of {elem}-byte elements", data.len());
    ensure!(perm.len() == shape.len(), "permutation {perm:?} does not fit shape {shape:?}");
    match elem {
        2 => Ok(permute_typed(&from_bytes::<2, u16>(data, u16::from_le_bytes), shape, perm, |v| v.to_le_bytes().to_vec())),
        4 => Ok(permute_typed(&from_bytes::<4, u32>(data, u32::from_le_bytes), shape, perm, |v| v.to_le_bytes().to_vec())),
        _ => bail!("unsupported element size {elem}"),
    }
}

fn from_bytes<const N: usize, T>(data: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N).map(|c| f(c.try_into().expect("exact chunk"))).collect()
}

fn permute_typed<T: Copy>(values: &[T], shape: &[usize], perm: &[usize], to_bytes: fn(T) -> Vec<u8>) -> Vec<u8> {
    let view = ArrayViewD::from_shape(IxDyn(shape), values).expect("length checked by caller");
    let permuted = view.permuted_axes(IxDyn(perm));
    let mut out = Vec::with_capacity(values.len() * std::mem::size_of::<T>());
    for v in permuted.iter() {
        out.extend_from_slice(&to_bytes(*v));
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
    fn dense_transposes() {
        // Keras (in=2, out=3): row i holds the weights from input i.
        let keras = f32_bytes(&[1., 2., 3., 4., 5., 6.]);
        let torch = Op::Dense.to_diffusers(&keras, &[2, 3], 4).unwrap();
        assert_eq!(torch, f32_bytes(&[1., 4., 2., 5., 3., 6.]));
        assert_eq!(Op::Dense.to_keras(&torch, &[3, 2], 4).unwrap(), keras);
    }

    #[test]
    fn conv_permutes_and_inverts() {
        let shape = [3usize, 2, 4, 5]; // kh, kw, in, out
        let values: Vec<f32> = (0..120).map(|v| v as f32).collect();
        let keras = f32_bytes(&values);
        let torch = Op::Conv.to_diffusers(&keras, &shape, 4).unwrap();
        // torch[o][i][y][x] == keras[y][x][i][o]
        let at = |o: usize, i: usize, y: usize, x: usize| {
            let idx = ((o * 4 + i) * 3 + y) * 2 + x;
            f32::from_le_bytes(torch[idx * 4..idx * 4 + 4].try_into().unwrap())
        };
        assert_eq!(at(4, 1, 2, 1), values[((2 * 2 + 1) * 4 + 1) * 5 + 4]);
        let d = Op::Conv.keras_shape(&[5, 4, 3, 2]);
        assert_eq!(d, shape);
        assert_eq!(Op::Conv.to_keras(&torch, &[5, 4, 3, 2], 4).unwrap(), keras);
    }

    #[test]
    fn conv1x1_becomes_linear() {
        let keras = f32_bytes(&[1., 2., 3., 4., 5., 6.]); // (1,1,in=2,out=3)
        let torch = Op::Conv1x1Linear.to_diffusers(&keras, &[1, 1, 2, 3], 4).unwrap();
        assert_eq!(torch, f32_bytes(&[1., 4., 2., 5., 3., 6.]));
        assert_eq!(Op::Conv1x1Linear.keras_shape(&[3, 2]), vec![1, 1, 2, 3]);
        assert_eq!(Op::Conv1x1Linear.to_keras(&torch, &[3, 2], 4).unwrap(), keras);
        assert!(Op::Conv1x1Linear.to_diffusers(&keras, &[2, 3], 4).is_err());
    }

    #[test]
    fn half_elements_move_whole() {
        let data: Vec<u8> = (0u8..12).collect(); // six 2-byte elements, shape (2,3)
        let out = permute(&data, &[2, 3], &[1, 0], 2).unwrap();
        assert_eq!(out, vec![0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]);
        assert!(permute(&data, &[2, 2], &[1, 0], 2).is_err());
    }
}
