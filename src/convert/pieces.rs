//! What both conversion directions share to stream tensors in pieces: the piece size, the pool of
//! reused output buffers circulating between the converting thread and the writer thread, and
//! filling one piece (re-laid-out, then cast where the dtype changes).

use super::phases::{time, Phase};
use crate::tensor::{cast_into, reuse, DType};
use std::sync::mpsc::{channel, Receiver, Sender};

/// The most bytes of a tensor produced at once (more for a tensor whose output rows are larger).
pub const PIECE: usize = 16 << 20;

/// Output buffers in circulation: one being filled, one queued, one being written.
const IN_FLIGHT: usize = 3;

/// The pool: the writer gives buffers back through the sender, the converter takes them.
pub fn pool() -> (Sender<Vec<u8>>, Receiver<Vec<u8>>) {
    let (give_back, take) = channel();
    for _ in 0..IN_FLIGHT {
        give_back.send(Vec::new()).expect("the receiver is alive");
    }
    (give_back, take)
}

/// Fills `out` with a piece of `len` bytes in dtype `from`, written by `fill`, re-encoded as `to`
/// (through `scratch` when they differ).
pub fn fill_piece(from: DType, to: DType, len: usize, fill: &dyn Fn(&mut [u8]), out: &mut Vec<u8>, scratch: &mut Vec<u8>) {
    if from == to {
        time(Phase::Permute, len, || fill(reuse(out, len)));
    } else {
        time(Phase::Permute, len, || fill(reuse(scratch, len)));
        time(Phase::Cast, len, || cast_into(from, scratch, to, out));
    }
}
