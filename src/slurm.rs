//! Slurm: a sweep as one job array, one array task per point (`sbatch`), and the queue's view
//! of it (`squeue`, `sacct`).

use anyhow::{Result, bail};

use crate::sweep::Sweep;

/// Writes the sweep's job-array script and submits it.
pub fn submit(sweep: &Sweep) -> Result<()> {
    let _ = sweep;
    bail!("the Slurm launcher is not written yet")
}
