//! Ranks of several processes joined over TCP: rank 0 listens on `MASTER_ADDR:port`, every other
//! rank connects to it (a star). The star carries the CPU backend's all-reduce (as torch's gloo
//! does for CPU tensors) and, for the NCCL backend, hands rank 0's NCCL id to the others.
//!
//! The all-reduce is rank 0 summing in rank order (its own values first, then rank 1's, ...) and
//! sending the sum back, so the result does not depend on which rank's bytes arrived first.
//!
//! Wire format (little-endian): a peer opens with `DRBR`, its rank (u32) and world size (u32);
//! each reduction is a u64 count then that many f32 values, each way.

use super::collective::Collective;
use anyhow::{bail, ensure, Context, Result};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"DRBR";

/// Where rank 0 listens, and how long the ranks wait for each other to show up.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    pub addr: String,
    pub port: u16,
    pub timeout: Duration,
}

/// One rank's connections: rank 0 holds one stream per other rank (index `r - 1`), the others
/// one stream to rank 0.
pub struct Star {
    rank: usize,
    world: usize,
    links: Vec<Mutex<(BufReader<TcpStream>, BufWriter<TcpStream>)>>,
}

fn link(s: TcpStream) -> Result<Mutex<(BufReader<TcpStream>, BufWriter<TcpStream>)>> {
    s.set_nodelay(true)?;
    Ok(Mutex::new((BufReader::new(s.try_clone()?), BufWriter::new(s))))
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

impl Star {
    /// Joins the ranks: rank 0 binds and waits for `world - 1` peers, the others connect
    /// (retrying until the timeout, since rank 0 may start later).
    pub fn join(rank: usize, world: usize, rv: &Rendezvous) -> Result<Star> {
        ensure!(rank < world, "rank {rank} is outside a world of {world} processes");
        let at = format!("{}:{}", rv.addr, rv.port);
        let deadline = Instant::now() + rv.timeout;
        if rank == 0 {
            let listener = TcpListener::bind(&at).with_context(|| format!("rank 0: cannot listen on {at} (another run there? choose --dist-port)"))?;
            listener.set_nonblocking(true)?;
            let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            while slots.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((s, from)) => {
                        s.set_nonblocking(false)?;
                        s.set_read_timeout(Some(rv.timeout))?;
                        let mut r = &s;
                        let mut magic = [0u8; 4];
                        r.read_exact(&mut magic).with_context(|| format!("rank 0: {from} did not introduce itself"))?;
                        if &magic != MAGIC {
                            eprintln!("rank 0: {from} is not a dreambridge rank; ignored");
                            continue;
                        }
                        let (peer, peer_world) = (read_u32(&mut r)? as usize, read_u32(&mut r)? as usize);
                        ensure!(peer_world == world, "rank {peer} at {from} says the world has {peer_world} processes, rank 0 says {world}");
                        ensure!((1..world).contains(&peer), "{from} claims rank {peer}, outside 1..{world}");
                        ensure!(slots[peer - 1].is_none(), "two processes claim rank {peer} (the second from {from})");
                        s.set_read_timeout(None)?;
                        slots[peer - 1] = Some(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<String> = slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| (i + 1).to_string()).collect();
                            bail!("rank 0 on {at}: ranks {} did not join within {:?}", missing.join(", "), rv.timeout);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e).with_context(|| format!("rank 0: accepting on {at}")),
                }
            }
            let links = slots.into_iter().map(|s| link(s.expect("all joined"))).collect::<Result<_>>()?;
            return Ok(Star { rank, world, links });
        }
        let stream = loop {
            match TcpStream::connect(&at) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e).with_context(|| format!("rank {rank}: cannot reach rank 0 at {at} within {:?}", rv.timeout)),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let mut hello = MAGIC.to_vec();
        hello.extend((rank as u32).to_le_bytes());
        hello.extend((world as u32).to_le_bytes());
        (&stream).write_all(&hello).with_context(|| format!("rank {rank}: introducing itself to {at}"))?;
        Ok(Star { rank, world, links: vec![link(stream)?] })
    }

    /// Rank 0's `bytes` on every rank (`bytes` is read on rank 0, filled on the others).
    pub fn broadcast(&self, bytes: &mut [u8]) -> Result<()> {
        if self.rank == 0 {
            for l in &self.links {
                let mut l = l.lock().unwrap();
                l.1.write_all(bytes)?;
                l.1.flush()?;
            }
        } else {
            self.links[0].lock().unwrap().0.read_exact(bytes).context("rank 0 went away")?;
        }
        Ok(())
    }
}

fn send(w: &mut impl Write, values: &[f32]) -> std::io::Result<()> {
    w.write_all(&(values.len() as u64).to_le_bytes())?;
    w.write_all(bytemuck::cast_slice(values))?;
    w.flush()
}

/// Reads a count and that many f32 values, handing them to `each` in chunks.
fn receive(r: &mut impl Read, expect: usize, mut each: impl FnMut(usize, &[f32])) -> Result<()> {
    let mut n = [0u8; 8];
    r.read_exact(&mut n)?;
    let n = u64::from_le_bytes(n) as usize;
    ensure!(n == expect, "all-reduce of {expect} values, but a peer sent {n}");
    let mut buf = vec![0f32; n.min(1 << 16)];
    let mut at = 0;
    while at < n {
        let chunk = &mut buf[..(n - at).min(1 << 16)];
        r.read_exact(bytemuck::cast_slice_mut(chunk))?;
        each(at, chunk);
        at += chunk.len();
    }
    Ok(())
}

impl Collective for Star {
    fn rank(&self) -> usize {
        self.rank
    }
    fn reduces(&self) -> bool {
        true
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        let n = values.len();
        if self.rank == 0 {
            for (i, l) in self.links.iter().enumerate() {
                let mut l = l.lock().unwrap();
                receive(&mut l.0, n, |at, chunk| values[at..at + chunk.len()].iter_mut().zip(chunk).for_each(|(v, c)| *v += c))
                    .with_context(|| format!("rank 0: all-reduce with rank {}", i + 1))?;
            }
            for (i, l) in self.links.iter().enumerate() {
                send(&mut l.lock().unwrap().1, values).with_context(|| format!("rank 0: sending the sum to rank {}", i + 1))?;
            }
        } else {
            let mut l = self.links[0].lock().unwrap();
            send(&mut l.1, values).with_context(|| format!("rank {}: all-reduce with rank 0", self.rank))?;
            receive(&mut l.0, n, |at, chunk| values[at..at + chunk.len()].copy_from_slice(chunk)).with_context(|| format!("rank {}: all-reduce with rank 0 (it went away?)", self.rank))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn three_ranks_sum_in_rank_order_and_share_bytes() {
        let rv = Rendezvous { addr: "127.0.0.1".into(), port: free_port(), timeout: Duration::from_secs(20) };
        let results: Vec<(Vec<f32>, [u8; 3])> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let rv = rv.clone();
                    s.spawn(move || {
                        let star = Star::join(rank, 3, &rv).unwrap();
                        let mut v: Vec<f32> = (0..100_000).map(|i| (i % 7) as f32 + rank as f32).collect();
                        star.all_reduce_sum(&mut v).unwrap();
                        star.barrier().unwrap();
                        let mut id = if rank == 0 { [7, 8, 9] } else { [0; 3] };
                        star.broadcast(&mut id).unwrap();
                        (v, id)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (v, id) in &results {
            assert_eq!(id, &[7, 8, 9]);
            assert!(v.iter().enumerate().all(|(i, x)| *x == 3.0 * (i % 7) as f32 + 3.0));
        }
    }

    #[test]
    fn contradictions_are_refused() {
        let rv = Rendezvous { addr: "127.0.0.1".into(), port: free_port(), timeout: Duration::from_secs(20) };
        let err = std::thread::scope(|s| {
            let r0 = s.spawn(|| Star::join(0, 2, &rv).err().map(|e| e.to_string()));
            // A peer that thinks the world has 3 processes.
            let _ = Star::join(1, 3, &rv);
            r0.join().unwrap()
        });
        assert!(err.unwrap().contains("says the world has 3 processes, rank 0 says 2"));
        let quick = Rendezvous { timeout: Duration::from_millis(300), ..rv };
        assert!(Star::join(0, 2, &quick).err().unwrap().to_string().contains("ranks 1 did not join"));
    }
}
