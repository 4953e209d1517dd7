"""The Slurm backend: notebook servers as Slurm jobs.

- :mod:`.jobscript` renders the job script and sbatch argv from a validated request (pure).
- :mod:`.scheduler` runs Slurm commands (argv lists only) and polls every job in one call.
- :mod:`.launch` is what runs inside the job: it takes the one-time token file, picks a
  port, reports it through the job's comment and execs ``jupyterhub-singleuser``. It is a
  standalone script (standard library only), run by path, so it starts fast.
- :mod:`.spawner` is :class:`SlurmGPUSpawner` (entry point ``slurm-gpu``).
- :mod:`.sweep` runs the untracked-job sweep after every hub start
  (:func:`sweep_on_hub_start`, called from jupyterhub_config.py).
- :mod:`.cli` adds ``sovereign-portal job-script``.
"""

from .sweep import sweep_on_hub_start

__all__ = ["sweep_on_hub_start"]
