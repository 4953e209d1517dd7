"""GDPR's pure parts (hub/gdpr.py, ledger.pseudonymised, the redaction rule of
ledger.verify), and what the portal puts in Slurm's accounting: no user name in job names or
comments."""

from __future__ import annotations

import stat
from dataclasses import replace
from pathlib import Path

import pytest
from sovereign_portal.extension.launchers import LaunchConfig, SlurmTorch
from sovereign_portal.hub import gdpr
from sovereign_portal.hub import ledger as L
from sovereign_portal.spawners.request import parse_request, resolve
from sovereign_portal.spawners.site import load_site
from sovereign_portal.spawners.slurm.jobscript import JobSpec, make_tag, sbatch_directives

from tests.support.slurm_cluster import SITE_FILE

pytestmark = pytest.mark.unit

ADA = "ada@uni-a.example"
NAMES = {ADA: "erased-1", "ada%40uni-a.example": "erased-1"}


def rec(**kw: object) -> L.Record:
    base: dict[str, object] = {
        "id": "r1", "user": ADA, "owner": ADA, "source": f"server:{ADA}/gpu",
        "opened_at": 1.0, "started_at": 1.0, "partition": "gpu-fr",
    }  # fmt: skip
    base.update(kw)
    return L.Record(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "want"),
    [
        ({}, {"user": "erased-1", "owner": "erased-1", "source": "server:erased-1/gpu"}),
        # a course or project owner never changes: its totals stay
        ({"owner_type": "course", "owner": "ada-course"}, {"owner": "ada-course"}),
        # a grant's source is an id, not a name, even if it looks like one
        ({"source": "grant:ada@uni-a.example"}, {"source": "grant:ada@uni-a.example"}),
        ({"note": f"refund for {ADA}, by mail"}, {"note": "refund for erased-1, by mail"}),
        ({"user": "bob", "owner": "bob", "source": "server:bob/"},
         {"user": "bob", "source": "server:bob/"}),
    ],
)  # fmt: skip
def test_pseudonymised_touches_only_personal_fields(kw: dict[str, object], want: dict) -> None:
    before = rec(**kw)
    after = L.pseudonymised(before, NAMES)
    for name, value in want.items():
        assert getattr(after, name) == value, name
    for f in ("partition", "amounts", "rates", "opened_at", "owner_type", "kind", "size"):
        assert getattr(after, f) == getattr(before, f)


def chained(rows: list[L.Record]) -> list[L.Record]:
    out, prev = [], L.GENESIS
    for i, r in enumerate(rows, 1):
        done = L.close(r, ended_at=100.0 + i, reason="stopped")
        placed = L.chain(done, i, prev)
        out.append(placed)
        prev = placed.hash or ""
    return out


def test_verify_accepts_a_redacted_row_only_with_its_log_entry() -> None:
    rows = chained([rec(id=f"r{i}") for i in range(3)])
    red = L.pseudonymised(rows[1], NAMES)  # keeps its original hash
    assert red.hash == rows[1].hash
    tampered = [rows[0], red, rows[2]]
    assert L.verify(tampered) is not None  # without the log: a changed row
    entry = {red.id: (str(red.hash), L.record_hash(red, str(red.prev_hash)))}
    assert L.verify(tampered, entry) is None
    # any other change of the redacted row still breaks the chain
    worse = replace(red, partition="gpu-de")
    found = L.verify([rows[0], worse, rows[2]], entry)
    assert found is not None and found.seq == 2 and "changed" in found.why
    # an entry with another original hash does not excuse it
    wrong = {red.id: ("0" * 64, entry[red.id][1])}
    assert L.verify(tampered, wrong) is not None


def test_pseudonym_key_file_is_made_0600_and_never_empty(tmp_path: Path) -> None:
    key = gdpr.load_key(tmp_path / "k.key")
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    assert gdpr.load_key(tmp_path / "k.key") == key  # the same key next time
    assert gdpr.pseudonym(key, ADA).startswith("erased-") and ADA not in gdpr.pseudonym(key, ADA)
    (tmp_path / "short.key").write_text("x\n")
    with pytest.raises(gdpr.GDPRError, match="pseudonym_key_file"):
        gdpr.load_key(tmp_path / "short.key")
    with pytest.raises(gdpr.GDPRError, match="does not exist"):
        gdpr.load_key(tmp_path / "none.key", create=False)


def test_name_forms_and_scrub_file(tmp_path: Path) -> None:
    forms = gdpr.name_forms([ADA])
    assert {"ada@uni-a.example", "ada%40uni-a.example"} <= set(forms)
    log = tmp_path / "hub.log"
    log.write_text(f"login: {ADA} role=student\n200 GET /user/ada%40uni-a.example/lab\nbob\n")
    n = gdpr.scrub_file(log, dict.fromkeys(forms, "erased-1"))
    assert n == 2
    assert log.read_text() == "login: erased-1 role=student\n200 GET /user/erased-1/lab\nbob\n"
    assert gdpr.scrub_file(log, dict.fromkeys(forms, "erased-1")) == 0


def test_sqlite_path() -> None:
    assert gdpr.sqlite_path("sqlite:////srv/p.sqlite") == Path("/srv/p.sqlite")
    assert gdpr.sqlite_path("sqlite:///:memory:") is None
    assert gdpr.sqlite_path("postgresql+psycopg://db/portal") is None


def test_slurm_job_names_and_comments_carry_no_user_name() -> None:
    """What Slurm accounting keeps of a job's identity (name, comment) names no person."""
    site = load_site(SITE_FILE)
    resolved = resolve(site, parse_request({"partition": "gpu-fr", "slice": "3g.40gb"}))
    spec = JobSpec(
        resolved=resolved,
        unix_user="spada",
        tag=make_tag(b"k", "0123456789ab"),
        home="/home/spada",
        python="/opt/venv/bin/python",
        token_file="/home/spada/.sovereign-portal/tokens/t",
        output="/home/spada/.sovereign-portal/logs/slurm-%j.log",
        env={"JUPYTERHUB_USER": ADA, "JUPYTERHUB_SERVICE_PREFIX": f"/user/{ADA}/"},
    )
    directives = sbatch_directives(spec)
    named = [d for d in directives if d.startswith(("--job-name=", "--comment="))]
    assert len(named) == 2
    assert not [d for d in named if "ada" in d], named
    grant = {"devices_per_node": 1, "scheduler_args": ["--partition=gpu-fr"], "workers": 1}
    torch = SlurmTorch(grant, Path("/home/spada/.sovereign-portal/sessions/0a1b2c3d4e5f"),
                       LaunchConfig())  # fmt: skip
    names = [o for o in torch.sbatch_options() if o.startswith(("--job-name=", "--comment="))]
    assert names == ["--job-name=portal-torch-0a1b2c3d4e5f"]
