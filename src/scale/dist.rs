//! One data-parallel run over several processes: which rank this process is, which device it
//! takes (GPU `LOCAL_RANK`), and the collective that joins it to the others (NCCL between GPUs,
//! the TCP star between CPU processes), as torch.distributed picks nccl or gloo.

use super::collective::{Collective, WorldOfOne};
use super::launch::{Env, Rank};
use super::tcp::Rendezvous;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::sync::Arc;
use std::time::Duration;

/// Whether this binary was built with the `nccl` feature (scripts/build-cuda.sh --nccl).
pub const NCCL_BUILT: bool = cfg!(feature = "nccl");

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// NCCL on GPUs, TCP on the CPU.
    Auto,
    Nccl,
    Tcp,
}

#[derive(Clone, Debug)]
pub struct DistConfig {
    pub rank: Rank,
    pub backend: Backend,
    pub rendezvous: Rendezvous,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig { rank: Rank::SINGLE, backend: Backend::Auto, rendezvous: Rendezvous { addr: "127.0.0.1".into(), port: 29501, timeout: Duration::from_secs(1800) } }
    }
}

impl DistConfig {
    /// From the launcher's variables (and flags): rank 0 listens on `MASTER_ADDR` (default
    /// 127.0.0.1) at `port`, default `MASTER_PORT + 1` (torchrun's own store holds
    /// `MASTER_PORT`), else 29501.
    pub fn new(rank: Rank, backend: Backend, port: Option<u16>, timeout: Duration, env: Env) -> Result<DistConfig> {
        let master_port = env("MASTER_PORT").map(|p| p.trim().parse::<u16>().with_context(|| format!("MASTER_PORT={p}: not a port"))).transpose()?;
        let port = match (port, master_port) {
            (Some(p), _) => p,
            (None, Some(p)) => p.checked_add(1).context("MASTER_PORT=65535 leaves no port for dreambridge's rendezvous; give --dist-port")?,
            (None, None) => 29501,
        };
        let addr = env("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        Ok(DistConfig { rank, backend, rendezvous: Rendezvous { addr, port, timeout } })
    }

    /// The device spec this rank trains on: with several ranks, `auto` and `cuda` mean the GPU
    /// `LOCAL_RANK` of this machine (one process per GPU); an explicit `cuda:N` or `cpu` stays.
    pub fn device_spec(&self, spec: &str) -> String {
        let gpu = format!("cuda:{}", self.rank.local_rank);
        match spec {
            _ if self.rank.world == 1 => spec.to_string(),
            "cuda" => gpu,
            "auto" if crate::device::CUDA_BUILT && Device::cuda_if_available(self.rank.local_rank).is_ok_and(|d| d.is_cuda()) => gpu,
            _ => spec.to_string(),
        }
    }

    /// Joins the other ranks (blocks until all are there). A world of one needs nobody, unless a
    /// backend is named (`--dist-backend nccl` on one GPU: the NCCL smoke test).
    /// The backend this process would join with on `dev` (`None`: it trains alone).
    fn backend_on(&self, dev: &Device) -> Option<Backend> {
        if self.rank.world == 1 && self.backend == Backend::Auto {
            return None;
        }
        Some(match (self.backend, dev.is_cuda()) {
            (Backend::Auto, true) | (Backend::Nccl, _) => Backend::Nccl,
            (Backend::Auto, false) | (Backend::Tcp, _) => Backend::Tcp,
        })
    }

    /// What can be refused before anything is loaded: NCCL asked of a binary built without it.
    pub fn check(&self, dev: &Device) -> Result<()> {
        if self.backend_on(dev) == Some(Backend::Nccl) && !NCCL_BUILT {
            let Rank { rank, world, .. } = self.rank;
            return nccl(dev, rank, world, &self.rendezvous).map(drop);
        }
        Ok(())
    }

    pub fn connect(&self, dev: &Device) -> Result<Arc<dyn Collective>> {
        let Rank { rank, world, .. } = self.rank;
        let Some(backend) = self.backend_on(dev) else {
            return Ok(Arc::new(WorldOfOne));
        };
        let rv = &self.rendezvous;
        // One write, so the ranks' lines do not interleave mid-line on a shared stderr.
        let line = format!("rank {rank} of {world}: joining through {}:{} ({backend:?})\n", rv.addr, rv.port);
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        let c: Arc<dyn Collective> = match backend {
            Backend::Tcp => Arc::new(super::tcp::Star::join(rank, world, rv)?),
            Backend::Nccl => nccl(dev, rank, world, rv)?,
            Backend::Auto => unreachable!("resolved above"),
        };
        Ok(c)
    }
}

#[cfg(feature = "nccl")]
fn nccl(dev: &Device, rank: usize, world: usize, rv: &Rendezvous) -> Result<Arc<dyn Collective>> {
    Ok(Arc::new(super::nccl::Nccl::connect(dev, rank, world, rv)?))
}

#[cfg(not(feature = "nccl"))]
fn nccl(_: &Device, rank: usize, world: usize, _: &Rendezvous) -> Result<Arc<dyn Collective>> {
    bail!(
        "rank {rank} of {world}: training across GPUs needs NCCL, and this dreambridge was built without it; build the binary with scripts/build-cuda.sh --nccl (or use --dist-backend tcp, which reduces through the host)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_and_devices_follow_the_launcher() {
        let env = |k: &str| match k {
            "MASTER_ADDR" => Some("node0".to_string()),
            "MASTER_PORT" => Some("29500".to_string()),
            _ => None,
        };
        let two = Rank { rank: 1, world: 2, local_rank: 1 };
        let c = DistConfig::new(two, Backend::Auto, None, Duration::from_secs(5), &env).unwrap();
        assert_eq!((c.rendezvous.addr.as_str(), c.rendezvous.port), ("node0", 29501));
        assert_eq!(DistConfig::new(two, Backend::Auto, Some(4000), Duration::from_secs(5), &env).unwrap().rendezvous.port, 4000);
        assert_eq!(DistConfig::new(two, Backend::Auto, None, Duration::from_secs(5), &|_| None).unwrap().rendezvous.port, 29501);
        assert!(DistConfig::new(two, Backend::Auto, None, Duration::from_secs(5), &|_| Some("x".into())).unwrap_err().to_string().contains("MASTER_PORT=x"));
        assert_eq!(c.device_spec("cuda"), "cuda:1");
        assert_eq!(c.device_spec("cuda:3"), "cuda:3");
        assert_eq!(c.device_spec("cpu"), "cpu");
        let one = DistConfig::default();
        assert_eq!(one.device_spec("cuda"), "cuda");
        assert!(one.connect(&Device::Cpu).unwrap().world() == 1);
        if !NCCL_BUILT {
            let c = DistConfig { backend: Backend::Nccl, ..c };
            assert!(c.connect(&Device::Cpu).err().unwrap().to_string().contains("scripts/build-cuda.sh --nccl"));
        }
    }
}
