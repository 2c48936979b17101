//! What the scheduler told this process: the manifest row of a job array (Kubernetes Indexed
//! Jobs' `JOB_COMPLETION_INDEX`, Slurm arrays' `SLURM_ARRAY_TASK_ID`, or `--index`), and the
//! rank and world size of a multi-process launch (torchrun's `RANK`/`WORLD_SIZE`/`LOCAL_RANK`,
//! Slurm's `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`, OpenMPI's `OMPI_COMM_WORLD_*`).
//! Sources that disagree are refused rather than one of them silently winning.

use anyhow::{bail, Context, Result};

/// Reads a variable; tests pass their own environment.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parse(name: &str, value: &str) -> Result<usize> {
    value.trim().parse().with_context(|| format!("{name}={value}: not a non-negative integer"))
}

/// The one value all the given sources agree on (`None` when none is set).
fn agreed(sources: &[(&str, Option<usize>)]) -> Result<Option<(String, usize)>> {
    let set: Vec<(&str, usize)> = sources.iter().filter_map(|(n, v)| v.map(|v| (*n, v))).collect();
    if let Some((first, value)) = set.first() {
        if let Some((other, v)) = set.iter().find(|(_, v)| v != value) {
            bail!("{first} says {value} but {other} says {v}: which one is meant?");
        }
        return Ok(Some((first.to_string(), *value)));
    }
    Ok(None)
}

fn var(env: Env, name: &str) -> Result<Option<usize>> {
    env(name).map(|v| parse(name, &v)).transpose()
}

/// The manifest row this process runs: `--index`, else the job array's index variable; `None`:
/// every row in turn.
pub fn row_index(flag: Option<usize>, env: Env) -> Result<Option<(String, usize)>> {
    agreed(&[("--index", flag), ("JOB_COMPLETION_INDEX", var(env, "JOB_COMPLETION_INDEX")?), ("SLURM_ARRAY_TASK_ID", var(env, "SLURM_ARRAY_TASK_ID")?)])
}

/// This process's place in a multi-process run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rank {
    pub rank: usize,
    pub world: usize,
    /// The device index on this machine.
    pub local_rank: usize,
}

impl Rank {
    pub const SINGLE: Rank = Rank { rank: 0, world: 1, local_rank: 0 };

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

/// The rank from flags (`--dist-rank`, `--dist-world-size`, `--local_rank`) and the launchers' variables;
/// a single process when none is set. A rank outside the world, or sources that disagree, are
/// refused.
pub fn rank(flags: (Option<usize>, Option<usize>, Option<usize>), env: Env) -> Result<Rank> {
    let rank = agreed(&[("--dist-rank", flags.0), ("RANK", var(env, "RANK")?), ("SLURM_PROCID", var(env, "SLURM_PROCID")?), ("OMPI_COMM_WORLD_RANK", var(env, "OMPI_COMM_WORLD_RANK")?)])?;
    let world = agreed(&[("--dist-world-size", flags.1), ("WORLD_SIZE", var(env, "WORLD_SIZE")?), ("SLURM_NTASKS", var(env, "SLURM_NTASKS")?), ("OMPI_COMM_WORLD_SIZE", var(env, "OMPI_COMM_WORLD_SIZE")?)])?;
    let local = agreed(&[("--local_rank", flags.2), ("LOCAL_RANK", var(env, "LOCAL_RANK")?), ("SLURM_LOCALID", var(env, "SLURM_LOCALID")?), ("OMPI_COMM_WORLD_LOCAL_RANK", var(env, "OMPI_COMM_WORLD_LOCAL_RANK")?)])?;
    let r = match (rank, world) {
        (None, None) => return Ok(Rank { local_rank: local.map_or(0, |l| l.1), ..Rank::SINGLE }),
        (Some((from, r)), Some((_, w))) => {
            anyhow::ensure!(w >= 1 && r < w, "{from} {r} is outside a world of {w} processes");
            Rank { rank: r, world: w, local_rank: local.map_or(r, |l| l.1) }
        }
        (Some((from, _)), None) => bail!("{from} is set but no world size (WORLD_SIZE, SLURM_NTASKS, OMPI_COMM_WORLD_SIZE or --dist-world-size)"),
        (None, Some((from, _))) => bail!("{from} is set but no rank (RANK, SLURM_PROCID, OMPI_COMM_WORLD_RANK or --dist-rank)"),
    };
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn job_array_indexes_are_read_and_contradictions_refused() {
        assert_eq!(row_index(None, &env(&[])).unwrap(), None);
        assert_eq!(row_index(None, &env(&[("JOB_COMPLETION_INDEX", "3")])).unwrap(), Some(("JOB_COMPLETION_INDEX".into(), 3)));
        assert_eq!(row_index(None, &env(&[("SLURM_ARRAY_TASK_ID", "7")])).unwrap().unwrap().1, 7);
        assert_eq!(row_index(Some(2), &env(&[("SLURM_ARRAY_TASK_ID", "2")])).unwrap().unwrap().1, 2);
        let err = row_index(Some(1), &env(&[("JOB_COMPLETION_INDEX", "4")])).unwrap_err().to_string();
        assert!(err.contains("--index says 1 but JOB_COMPLETION_INDEX says 4"), "{err}");
        assert!(row_index(None, &env(&[("SLURM_ARRAY_TASK_ID", "x")])).unwrap_err().to_string().contains("SLURM_ARRAY_TASK_ID=x"));
    }

    #[test]
    fn launcher_ranks_parse_and_contradictions_are_refused() {
        assert_eq!(rank((None, None, None), &env(&[])).unwrap(), Rank::SINGLE);
        let torchrun = env(&[("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")]);
        assert_eq!(rank((None, None, None), &torchrun).unwrap(), Rank { rank: 3, world: 4, local_rank: 1 });
        let slurm = env(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "1")]);
        assert_eq!(rank((None, None, None), &slurm).unwrap(), Rank { rank: 1, world: 2, local_rank: 1 });
        let mpi = env(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_LOCAL_RANK", "0")]);
        assert!(rank((None, None, None), &mpi).unwrap().is_main());
        assert_eq!(rank((Some(1), Some(2), None), &env(&[])).unwrap(), Rank { rank: 1, world: 2, local_rank: 1 });
        let both = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")]);
        assert!(rank((None, None, None), &both).unwrap_err().to_string().contains("RANK says 0 but SLURM_PROCID says 1"));
        assert!(rank((None, None, None), &env(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err().to_string().contains("outside a world of 2"));
        assert!(rank((None, None, None), &env(&[("RANK", "0")])).unwrap_err().to_string().contains("no world size"));
    }
}
