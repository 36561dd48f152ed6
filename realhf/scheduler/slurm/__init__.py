"""``mode=slurm``: worker groups as sbatch jobs (see :mod:`realhf.scheduler.slurm.client`)."""
