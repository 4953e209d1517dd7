"""Compute sessions across two real Slurm sites: paris (FR, its CLI) and julich (DE, its
slurmrestd with JWT), each its own cluster (``slurm_sites``).

The portal service is the real app (admission, the per-site watch, the ledger on a SQLite
portal database); only hub authentication is a token table (as in test_sessions_slurm.py).
The notebook server's site comes from its open ledger record, written here through the
real ledger store as the hub's spawner writes it at spawn. The hub host's own cluster is
paris (``SLURM_CONF`` of this process), so a service that polled through the hub host's
CLI would look in the wrong cluster (job ids are each cluster's own).

1. a notebook in DE gets its Dask session in DE: its jobs run on julich's node, the service
   watches them through julich's slurmrestd (paris's poller, its CLI, never sees them), and the
   ledger record carries site julich, country DE and its operator, and closes "stopped";
2. a session never leaves its notebook's site: an FR-only caller whose notebook is in DE is
   refused (never DE), as is a request for the other site's partition; nothing is held.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest
import requests
from sovereign_portal.extension.client import DaskSession, handle_for
from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.budget_store import DB_URL_ENV
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.store import PortalStore
from sovereign_portal.spawners.slurm.client import CALLS, SlurmCLI
from sovereign_portal.spawners.slurm.rest import SlurmREST

from tests.support.sessions import JupyterServer, PortalServiceThread
from tests.support.slurm_cluster import (  # noqa: F401 - the fixture
    SlurmCluster,
    slurm_sites,
    write_site_file,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slurm_sites, pytest.mark.timeout(300)]

# workers cannot import the tests package: ship this module's functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ALICE, CAROL, DAVE = "server-token-alice", "server-token-carol", "server-token-dave"
RESIDENCY = {"proj-fr": ["FR"], "proj-eu": ["FR", "DE"]}
USERS = {
    ALICE: {"name": "sxalice", "groups": ["researcher", "proj-eu"], "server": ""},
    CAROL: {"name": "sxcarol", "groups": ["researcher", "proj-fr"], "server": ""},
    DAVE: {"name": "sxdave", "groups": ["researcher", "proj-eu"], "server": ""},
}


def notebook_record(db: str, user: str, site: str, partition: str, country: str) -> None:
    """The open record of ``user``'s default server, as the hub's spawner opens it."""
    store = PortalStore(db)
    store.upgrade()
    try:
        LedgerStore(store).open(
            L.Record(
                id=L.new_id(),
                user=user,
                role="researcher",
                owner=user,
                size="h100:1",
                accelerator="h100",
                gpus=1,
                walltime_minutes=60,
                partition=partition,
                site=site,
                country=country,
                source=f"server:{user}/",
                opened_at=time.time(),
                started_at=time.time(),
                rates=L.Rates(1.0, 2.4, 700.0, 380.0),
            )
        )
    finally:
        store.dispose()


def records(db: str, source_prefix: str) -> list[L.Record]:
    store = PortalStore(db)
    try:
        ledger = LedgerStore(store)
        return [
            r
            for r in [*ledger.chained(), *ledger.list_open()]
            if r.source.startswith(source_prefix)
        ]
    finally:
        store.dispose()


@pytest.fixture(scope="module")
def fed(
    slurm_sites: dict[str, SlurmCluster],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("sites-sessions")
    d.chmod(0o755)
    paris, julich = slurm_sites["paris"], slurm_sites["julich"]
    token = julich.write_token(d / "julich.jwt", user="root")
    site = write_site_file(d / "two-sites.toml", paris, julich, token)
    db = f"sqlite:///{d / 'portal.sqlite'}"
    mp = pytest.MonkeyPatch()
    mp.setenv(DB_URL_ENV, db)
    mp.setenv("SLURM_CONF", str(paris.conf))  # the hub host's own cluster is paris
    notebook_record(db, "sxalice", "julich", "gpu-de", "DE")
    notebook_record(db, "sxcarol", "julich", "gpu-de", "DE")
    notebook_record(db, "sxdave", "paris", "gpu-fr", "FR")
    svc = PortalServiceThread(
        str(site), USERS, residency=RESIDENCY, session_poll_interval=1.0
    ).start()
    try:
        yield {"svc": svc, "paris": paris, "julich": julich, "db": db, "dir": d}
    finally:
        svc.stop()
        mp.undo()
        for c in (paris, julich):
            c.cancel_all_jobs()


def portal_jobs(c: SlurmCluster) -> list[dict[str, str]]:
    return [j for j in c.jobs() if j["name"].startswith("portal-")]


def _where() -> str:
    return os.environ.get("SLURMD_NODENAME", "")


def test_a_notebook_in_de_gets_its_session_in_de_watched_through_slurmrestd(
    fed: dict[str, Any],
) -> None:
    svc, paris, julich, db = fed["svc"], fed["paris"], fed["julich"], fed["db"]
    work = fed["dir"] / "alice"
    work.mkdir()
    work.chmod(0o755)
    srv = JupyterServer(work, svc.url, ALICE, memory_per_worker="1GiB")
    srv.env["SLURM_CONF"] = str(julich.conf)  # as slurmd sets it on julich's node
    srv.start()
    before = dict(CALLS)
    try:
        c = srv.client()
        info = c.create({"kind": "dask", "gpus": 1, "accelerator": "h100"})  # no partition
        try:
            info = c.wait(info["id"], 120)
        except BaseException:
            c.stop(info["id"])
            raise
        s = handle_for(c, info)
        assert isinstance(s, DaskSession)
        try:
            assert set(s.client.run(_where).values()) == {"de-h100-a"}
            on_de = [j for j in portal_jobs(julich) if j["state"] == "RUNNING"]
            assert len(on_de) == 1
            assert [j for j in portal_jobs(paris) if j["state"] in ("PENDING", "RUNNING")] == []
            (rec,) = [r for r in records(db, "grant:") if r.user == "sxalice"]
            assert (rec.site, rec.country, rec.partition) == ("julich", "DE", "gpu-de")
            assert rec.operator == "Test Centre DE" and rec.end_reason is None
            gid = rec.source.split(":", 1)[1]
            jobs = svc.service.session_jobs
            watch = jobs.grants[gid]
            assert watch.site == "julich" and watch.jobs == (on_de[0]["id"],)
            # watched through julich's slurmrestd, never the hub host's (paris's) CLI
            de_poller = jobs.poller_for("julich")
            assert isinstance(de_poller.client, SlurmREST) and de_poller.client.calls > 0
            assert on_de[0]["id"] in de_poller.tracked
            assert on_de[0]["id"] not in jobs.poller_for("paris").tracked
            fr_client = jobs.poller_for("paris").client
            assert isinstance(fr_client, SlurmCLI) and fr_client.env is not None
            assert fr_client.env["SLURM_CONF"] == str(paris.conf)
            # the service saw it running at julich: the record has its start and node
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                (rec,) = records(db, f"grant:{gid}")
                if rec.started_at is not None:
                    break
                time.sleep(0.5)
            assert rec.started_at is not None and rec.nodes == "de-h100-a", rec
        finally:
            s.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            (rec,) = records(db, f"grant:{gid}")
            if rec.closed:
                break
            time.sleep(0.5)
        assert rec.closed and rec.end_reason == "stopped", rec
        assert (rec.site, rec.country) == ("julich", "DE")
    finally:
        srv.stop()
    assert srv.egress() == "", srv.egress()
    rest = sum(v - before.get(k, 0) for k, v in CALLS.items() if k.startswith("rest:GET"))
    assert rest >= 1, dict(CALLS)


def _grant(svc: PortalServiceThread, token: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(
        svc.url + "api/grants",
        json=body,
        headers={"Authorization": f"token {token}"},
        timeout=10,
    )


def test_a_session_never_leaves_its_notebooks_site(fed: dict[str, Any]) -> None:
    svc, paris, julich, db = fed["svc"], fed["paris"], fed["julich"], fed["db"]
    # FR-only, with a notebook in DE: refused, never placed in DE (nor moved to FR)
    r = _grant(svc, CAROL, {"kind": "dask", "gpus": 1})
    assert r.status_code == 403, r.text
    assert "site julich (DE), where your rules allow no partition" in r.text
    # an EU user's notebook in FR asking for DE's partition: refused, naming both sites
    r = _grant(svc, DAVE, {"kind": "dask", "gpus": 1, "partition": "gpu-de"})
    assert r.status_code == 403, r.text
    assert "'gpu-de' is at site julich" in r.text and "paris (FR)" in r.text
    # and the same user without a partition is placed at paris
    r = _grant(svc, DAVE, {"kind": "dask", "gpus": 1})
    assert r.status_code == 201, r.text
    assert r.json()["partition"] == "gpu-fr"
    gid = r.json()["id"]
    requests.delete(
        svc.url + f"api/grants/{gid}", headers={"Authorization": f"token {DAVE}"}, timeout=10
    )
    assert [x.user for x in records(db, "grant:") if x.user == "sxcarol"] == []
    assert not any(
        j["user"] in ("sxcarol", "sxdave") for j in [*portal_jobs(paris), *portal_jobs(julich)]
    )
