"""The per-site part of a GDPR erase's receipt (hub/gdpr_cli.py ``site_receipt``): for each
declared site, the jobs cancelled and records closed there, the user's records that ran
there, and that site's job logs in ~/.sovereign-portal (their names carry the site)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sovereign_portal.hub.gdpr_cli import site_receipt
from sovereign_portal.hub.ledger import Rates, Record
from sovereign_portal.spawners.site import load_site

from tests.support.slurm_cluster import TWO_SITE_FILE

pytestmark = pytest.mark.unit


def test_the_receipt_lists_what_each_site_had(tmp_path: Path) -> None:
    site = load_site(TWO_SITE_FILE)
    home = tmp_path / "home"
    logs = home / ".sovereign-portal" / "logs"
    logs.mkdir(parents=True)
    for name in ("slurm-julich-12.log", "slurm-julich-13.log", "slurm-paris-12.log", "x.log"):
        (logs / name).write_text("log")
    rates = Rates(1.0, 1.0, 1.0, 1.0)
    records = [
        Record(id="a", user="ada", site="julich", rates=rates),
        Record(id="b", user="ada", site="julich", rates=rates),
        Record(id="c", user="ada", site="paris", rates=rates),
    ]
    stopped = [
        {"site": "julich", "jobs": ["13"], "records_closed": 1},
        {"site": "paris", "jobs": [], "records_closed": 0, "errors": ["cancel 9: refused"]},
    ]
    got = {s["site"]: s for s in site_receipt(site, stopped, records, home)}
    assert list(got) == ["paris", "julich"]  # site-file order
    de, fr = got["julich"], got["paris"]
    assert (de["country"], de["operator"], de["transport"]) == ("DE", "Test Centre DE", "rest")
    assert de["jobs_cancelled"] == ["13"] and de["records_closed"] == 1
    assert de["ledger_records_pseudonymised"] == 2
    assert de["job_logs_deleted"] == [
        "~/.sovereign-portal/logs/slurm-julich-12.log",
        "~/.sovereign-portal/logs/slurm-julich-13.log",
    ]
    assert fr["errors"] == ["cancel 9: refused"] and fr["ledger_records_pseudonymised"] == 1
    assert fr["job_logs_deleted"] == ["~/.sovereign-portal/logs/slurm-paris-12.log"]
    # no home known: nothing listed as deleted, the rest still per site
    none = site_receipt(site, [], records, None)
    assert [s["job_logs_deleted"] for s in none] == [[], []]
