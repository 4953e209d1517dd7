"""The Slurm backend: notebook servers as Slurm jobs.

- :mod:`.jobscript` renders the job script and sbatch argv from a validated request (pure).
- :mod:`.scheduler` runs Slurm commands (argv lists only) and polls every job in one call.
- :mod:`.launch` is what runs inside the job: it takes the one-time token file, picks a
  port, reports it through the job's comment and execs ``jupyterhub-singleuser``.
- :mod:`.spawner` is :class:`SlurmGPUSpawner` (entry point ``slurm-gpu``).
- :mod:`.cli` adds ``sovereign-portal job-script``.
"""
