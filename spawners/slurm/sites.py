"""Several Slurm sites: one scheduler client, one poller and one state per site.

- :func:`client_for` builds a site's :class:`~.client.SchedulerClient` from the site file:
  the CLI on the hub's host (with the site's ``SLURM_CONF``), or its slurmrestd
  (:class:`~.rest.SlurmREST`). :func:`site_clients` lists every configured site's client
  (the erase, the sweep and the reconciliation reach each site through it).
- :func:`site_pollers` gives each site its own :class:`~.scheduler.JobPoller`, sharing a
  per-site queue snapshot file (``<file>.<site>``): one whole-queue query per site per
  interval, whatever the number of servers and sessions there. A site that does not
  answer leaves only its own jobs unknown (never stopped); the others go on.
- :func:`site_state` turns one site's last whole-queue answer into the
  :class:`~..placement.SiteState` placement reads: free devices per partition (the site
  file's capacity less what running jobs hold; none while jobs wait there) and a rough
  queue estimate. No extra scheduler call: the form's state comes from the poll.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..placement import HOST_SITE, SiteState
from ..site import CLIScheduler, ClusterSite, Partition, RESTScheduler, Site
from .client import JobInfo, SchedulerClient, SlurmCLI, slurm_env
from .rest import SlurmREST
from .scheduler import JobPoller
from .snapshot import QueueSnapshot

_CLIENTS: dict[tuple[str, str, tuple[str, ...]], SchedulerClient] = {}
_POLLERS: dict[tuple[str, str, float, float, float, str], JobPoller] = {}


def client_for(
    cs: ClusterSite | None, submit_prefix: Sequence[str] = (), timeout: float = 30
) -> SchedulerClient:
    """The scheduler client of site ``cs`` (None: the hub host's own cluster), one per
    process and settings."""
    key = (cs.name if cs else HOST_SITE, cs.model_dump_json() if cs else "", tuple(submit_prefix))
    if key not in _CLIENTS:
        if cs is not None and isinstance(cs.scheduler, RESTScheduler):
            _CLIENTS[key] = SlurmREST(
                cs.scheduler.url, cs.scheduler.token_file, timeout=cs.scheduler.timeout_seconds
            )
        else:
            env = slurm_env()
            if (
                cs is not None
                and isinstance(cs.scheduler, CLIScheduler)
                and cs.scheduler.slurm_conf
            ):
                env["SLURM_CONF"] = cs.scheduler.slurm_conf
            _CLIENTS[key] = SlurmCLI(env=env, submit_prefix=submit_prefix, timeout=timeout)
    return _CLIENTS[key]


def site_client(
    cs: ClusterSite,
    *,
    submit_prefix: Sequence[str] = (),
    timeout: float = 30,
    squeue: str = "squeue",
) -> SchedulerClient:
    """A new client of site ``cs`` with these settings (the portal service's session
    poll and its budget stops): its slurmrestd, or its CLI with the site's SLURM_CONF.
    Never the hub host's own cluster for a declared site."""
    if isinstance(cs.scheduler, RESTScheduler):
        return SlurmREST(
            cs.scheduler.url, cs.scheduler.token_file, timeout=cs.scheduler.timeout_seconds
        )
    env = slurm_env()
    if isinstance(cs.scheduler, CLIScheduler) and cs.scheduler.slurm_conf:
        env["SLURM_CONF"] = cs.scheduler.slurm_conf
    return SlurmCLI(env=env, submit_prefix=submit_prefix, timeout=timeout, squeue=squeue)


def site_clients(site: Site, submit_prefix: Sequence[str] = ()) -> dict[str, SchedulerClient]:
    """Every configured site's client, by site name (``local`` without [[sites]])."""
    if not site.sites:
        return {HOST_SITE: client_for(None, submit_prefix)}
    return {cs.name: client_for(cs, submit_prefix) for cs in site.sites}


def site_pollers(
    site: Site,
    interval: float,
    jitter: float,
    fast_interval: float,
    snapshot_file: str = "",
) -> dict[str, JobPoller]:
    """One poller per site (process-wide, like :func:`.scheduler.shared_poller`); each
    site's whole-queue answer is shared through ``snapshot_file.<site>``."""
    out: dict[str, JobPoller] = {}
    for name, client in site_clients(site).items():
        key = (site.name, name, interval, jitter, fast_interval, snapshot_file)
        if key not in _POLLERS:
            snap = QueueSnapshot(f"{snapshot_file}.{name}") if snapshot_file else None
            _POLLERS[key] = JobPoller(
                interval, jitter, fast_interval, client=client, whole_queue=True, snapshot=snap
            )
        out[name] = _POLLERS[key]
    return out


def capacity(p: Partition) -> int:
    """Devices (whole GPUs and MIG slices) of a partition, from the site file."""
    return sum(
        (len(nt.whole_gpus) + sum(nt.slices_per_node().values())) * nt.count for nt in p.nodes
    )


def site_state(
    site: Site,
    name: str,
    queue: Mapping[str, JobInfo] | None,
    *,
    why: str = "",
) -> SiteState:
    """The state of site ``name`` from its last whole-queue answer (None: it did not
    answer, so it is not offered). Pure.

    Free devices of a partition: its capacity less the devices of its running jobs, and 0
    while any job waits there for resources (the scheduler would run that one first).
    Queue estimate: the pending jobs there × the partition's default walltime, spread over
    its nodes; 0 when it has room."""
    parts = [p for p in site.partitions if p.backend == "slurm" and (p.site or HOST_SITE) == name]
    if queue is None:
        return SiteState(reachable=False, why=why or "its scheduler does not answer")
    free: dict[str, int] = {}
    minutes: dict[str, float] = {}
    for p in parts:
        jobs = [j for j in queue.values() if j.partition == p.scheduler_partition]
        used = sum(j.devices for j in jobs if j.state in ("RUNNING", "CONFIGURING", "COMPLETING"))
        waiting = [j for j in jobs if j.state == "PENDING"]
        free[p.name] = 0 if waiting else max(0, capacity(p) - used)
        nodes = max(1, sum(nt.count for nt in p.nodes))
        minutes[p.name] = (
            0.0 if free[p.name] else (len(waiting) + 1) * p.default_walltime_minutes / nodes
        )
    return SiteState(True, free, minutes)


def site_states(site: Site, pollers: Mapping[str, JobPoller]) -> dict[str, SiteState]:
    """Every site's state from its poller's last answer: a site whose last poll failed,
    or that has not answered yet, is unreachable."""
    out = {}
    for name, poller in pollers.items():
        ok = poller.last_ok > 0 and poller.last_error is None
        out[name] = site_state(site, name, poller.queue if ok else None)
    return out


async def refresh_states(
    site: Site, pollers: Mapping[str, JobPoller], max_age: float
) -> dict[str, SiteState]:
    """:func:`site_states` after polling each site whose last answer is older than
    ``max_age`` seconds (all sites at once; joins a poll already in flight)."""
    import asyncio
    import time

    now = time.monotonic()
    stale = [p for p in pollers.values() if now - p.last_ok > max_age or p.last_error]
    if stale:
        await asyncio.gather(*(p.refresh() for p in stale))
    return site_states(site, pollers)
