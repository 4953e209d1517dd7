"""Reconcile the ledger with Slurm's own accounting (``sacct``): report, never hide.

For every closed usage record that ran as Slurm jobs, Slurm's accounting says how long the
jobs ran (``ElapsedRaw``) and how many devices they held (``gres/gpu`` in ``AllocTRES``;
a MIG slice is one device). :func:`compare` puts that beside what the ledger recorded and
returns one :class:`Difference` per disagreement beyond the tolerance. Nothing is changed:
an operator corrects a record with an adjustment row (:func:`.ledger.adjustment`).

Wall time: a record's time is ``ended_at - started_at`` (``opened_at`` when it never
started); a record with several jobs (a Dask session's workers) ran as long as its longest
job. Devices: ``gpus`` for whole GPUs, ``count`` slices for a MIG size, summed over jobs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sovereign_portal.spawners.slurm.sacct import SacctJob

from .ledger import Record

#: Seconds of difference always tolerated (the hub and slurmctld see a start and an end a
#: poll interval apart), and the relative share tolerated on top of that.
DEFAULT_TOLERANCE_S = 30.0
DEFAULT_TOLERANCE_FRACTION = 0.05


@dataclass(frozen=True)
class Difference:
    """One disagreement between a ledger record and Slurm's accounting."""

    record_id: str
    user: str
    job_ids: tuple[str, ...]
    what: str  # "missing", "elapsed" or "devices"
    ledger: float
    slurm: float
    detail: str

    def to_json(self) -> dict[str, object]:
        return {
            "record": self.record_id,
            "user": self.user,
            "job_ids": list(self.job_ids),
            "what": self.what,
            "ledger": self.ledger,
            "slurm": self.slurm,
            "detail": self.detail,
        }


def ledger_seconds(rec: Record) -> float:
    start = rec.started_at if rec.started_at is not None else rec.opened_at
    return max(0.0, (rec.ended_at or start) - start)


def ledger_devices(rec: Record) -> int:
    return rec.count if rec.slice else rec.gpus


def reconcilable(records: Iterable[Record]) -> list[Record]:
    """Closed usage records that ran as Slurm jobs."""
    return [r for r in records if r.closed and r.row_type == "usage" and r.job_ids]


def compare(
    records: Iterable[Record],
    slurm: Mapping[str, SacctJob],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    tolerance_fraction: float = DEFAULT_TOLERANCE_FRACTION,
) -> list[Difference]:
    """Every record whose Slurm accounting disagrees with it beyond the tolerance."""
    if tolerance_s < 0 or not 0 <= tolerance_fraction < 1:
        raise ValueError("tolerance_s must be ≥ 0 and tolerance_fraction in [0, 1)")
    out: list[Difference] = []
    for rec in reconcilable(records):
        jobs = [slurm.get(j) for j in rec.job_ids]
        missing = [j for j, s in zip(rec.job_ids, jobs, strict=True) if s is None]
        if missing:
            out.append(
                Difference(
                    rec.id,
                    rec.user,
                    rec.job_ids,
                    "missing",
                    len(rec.job_ids),
                    len(rec.job_ids) - len(missing),
                    f"Slurm accounting has no record of job(s) {', '.join(missing)}",
                )
            )
            continue
        found = [s for s in jobs if s is not None]
        mine, theirs = ledger_seconds(rec), float(max(s.elapsed_s for s in found))
        if abs(mine - theirs) > tolerance_s + tolerance_fraction * max(mine, theirs):
            out.append(
                Difference(
                    rec.id,
                    rec.user,
                    rec.job_ids,
                    "elapsed",
                    round(mine, 3),
                    theirs,
                    f"the ledger says {mine:.0f} s, Slurm says {theirs:.0f} s",
                )
            )
        devices = sum(s.gpus for s in found)
        if devices != ledger_devices(rec):
            out.append(
                Difference(
                    rec.id,
                    rec.user,
                    rec.job_ids,
                    "devices",
                    ledger_devices(rec),
                    devices,
                    f"the ledger bills {ledger_devices(rec)} device(s), Slurm allocated {devices}",
                )
            )
    return out


async def reconcile(
    records: Iterable[Record],
    *,
    env: Mapping[str, str] | None = None,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    tolerance_fraction: float = DEFAULT_TOLERANCE_FRACTION,
) -> tuple[int, list[Difference]]:
    """(records checked, differences): one batched sacct for every job of ``records``."""
    from sovereign_portal.spawners.slurm.sacct import sacct_jobs

    todo = reconcilable(records)
    jobs = [j for r in todo for j in r.job_ids]
    slurm = await sacct_jobs(jobs, env=env) if jobs else {}
    return len(todo), compare(
        todo, slurm, tolerance_s=tolerance_s, tolerance_fraction=tolerance_fraction
    )


# -- several sites: one report per site ---------------------------------------------------
#: A site's reconciliation: "ok" (its accounting answered), "none" (the site file declares
#: no accounting there: its records are listed, not checked) or "error" (it did not answer).
SITE_STATUSES = ("ok", "none", "error")


@dataclass(frozen=True)
class SiteReport:
    """The reconciliation of one site's closed records with that site's own accounting."""

    site: str
    country: str
    status: str
    records: int
    differences: tuple[Difference, ...] = ()
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "site": self.site,
            "country": self.country,
            "status": self.status,
            "records": self.records,
            "differences": [d.to_json() for d in self.differences],
            "detail": self.detail,
        }


def by_site(records: Iterable[Record], sites: Iterable[str]) -> dict[str, list[Record]]:
    """Closed Slurm records grouped by the declared site they ran at; job ids are a site's
    own, so a record is checked at its own site only. Records of no declared site are
    under "" (reported, never checked against another site's accounting)."""
    names = list(sites)
    out: dict[str, list[Record]] = {n: [] for n in names}
    for r in reconcilable(records):
        out.setdefault(r.site if r.site in names else "", []).append(r)
    return out


async def reconcile_sites(
    records: Iterable[Record],
    site: Any,
    clients: Mapping[str, Any],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    tolerance_fraction: float = DEFAULT_TOLERANCE_FRACTION,
) -> list[SiteReport]:
    """One :class:`SiteReport` per declared site of ``site`` (a Site with [[sites]]), in
    site-file order, plus one for records of no declared site if there are any. Each site
    with ``accounting = true`` is asked once (all its jobs in one call) through its own
    client (``clients[name]``: sacct with its SLURM_CONF, or slurmrestd's /slurmdb/), all
    sites at once; a site that does not answer is an "error" report and the others go on;
    a site without accounting is a "none" report that says so."""
    import asyncio

    from sovereign_portal.spawners.slurm.sacct import site_accounting

    declared = {cs.name: cs for cs in site.sites}
    groups = by_site(records, declared)

    async def one(name: str, recs: list[Record]) -> SiteReport:
        cs = declared.get(name)
        if cs is None:
            return SiteReport(
                "",
                "",
                "error",
                len(recs),
                detail="record(s) of no declared site: not checked against any site's "
                "accounting (job ids are a site's own)",
            )
        if not cs.accounting:
            return SiteReport(
                name,
                cs.country,
                "none",
                len(recs),
                detail=f"no accounting at this site ({name} declares no slurmdbd): "
                f"{len(recs)} record(s) not reconciled",
            )
        if not recs:
            return SiteReport(name, cs.country, "ok", 0)
        since = min(r.opened_at for r in recs)
        try:
            slurm = await site_accounting(
                clients[name], [j for r in recs for j in r.job_ids], since=since
            )
        except Exception as e:  # one site's trouble never hides the others' reports
            return SiteReport(name, cs.country, "error", len(recs), detail=str(e)[:500])
        diffs = compare(recs, slurm, tolerance_s=tolerance_s, tolerance_fraction=tolerance_fraction)
        return SiteReport(name, cs.country, "ok", len(recs), tuple(diffs))

    names = [*declared, *([""] if groups.get("") else [])]
    return list(await asyncio.gather(*(one(n, groups.get(n, [])) for n in names)))


def print_site_reports(reports: list[SiteReport], as_json: bool, out: object) -> None:
    import json

    write = out.write  # type: ignore[attr-defined]
    if as_json:
        write(json.dumps({"sites": [r.to_json() for r in reports]}))
        write("\n")
        return
    for r in reports:
        where = f"{r.site} ({r.country})" if r.site else "no declared site"
        for d in r.differences:
            jobs = ",".join(d.job_ids)
            write(f"{d.what:8} {where} record {d.record_id} ({d.user}, job {jobs}): {d.detail}\n")
        if r.status == "ok":
            verdict = "agree" if not r.differences else f"{len(r.differences)} difference(s)"
            write(f"site {where}: {r.records} record(s) checked with its accounting, {verdict}\n")
        else:
            write(f"site {where}: {r.detail}\n")


def print_differences(checked: int, diffs: list[Difference], as_json: bool, out: object) -> None:
    import json

    write = out.write  # type: ignore[attr-defined]
    if as_json:
        write(json.dumps({"checked": checked, "differences": [d.to_json() for d in diffs]}))
        write("\n")
        return
    for d in diffs:
        jobs = ",".join(d.job_ids)
        write(f"{d.what:8} record {d.record_id} ({d.user}, job {jobs}): {d.detail}\n")
    verdict = "agree with Slurm" if not diffs else f"{len(diffs)} difference(s)"
    write(f"ledger reconcile: {checked} Slurm record(s) checked, {verdict}\n")
