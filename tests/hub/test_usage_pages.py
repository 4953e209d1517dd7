"""The usage pages on the real hub that ``hub.portal.configure()`` sets up, with real IdP
logins (alice and bob: students of ml101 and cv202; ivan: instructor of ml101; olga:
operator) and ledger rows written through the real ledger store into the hub's portal
database. Who sees which page is JupyterHub RBAC: 403 with a message without the scope,
404 for an unknown course, 400 naming a bad query parameter. The egress guard's log stays
empty."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html import unescape

import pytest
import requests

from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP, oidc_login
from tests.support.ledger_rows import closed_record
from tests.support.portal import portal_stack

pytestmark = [pytest.mark.hub, pytest.mark.idp]

ALICE, BOB = "alice@uni-a.example", "bob@uni-a.example"
IVAN, OLGA = "ivan@uni-a.example", "olga@uni-a.example"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    with portal_stack(tmp_path_factory.mktemp("usage-pages")) as (hub, idp):
        db = f"sqlite:///{hub.dir / 'portal.sqlite'}"
        # alice: 2 h charged to ml101 yesterday, 1 h of her own 3 days ago, 5 h long ago
        closed_record(db, ALICE, 2, owner_type="course", owner="ml101", ended_days_ago=1)
        closed_record(db, ALICE, 1, ended_days_ago=3, partition="gpu-de", country="DE",
                      site="HPC centre DE")  # fmt: skip
        closed_record(db, ALICE, 5, ended_days_ago=400)
        # bob: 3 h charged to cv202
        closed_record(db, BOB, 3, owner_type="course", owner="cv202", ended_days_ago=2)
        yield hub, idp
        hub.assert_no_egress()


@pytest.fixture(scope="module")
def sessions(stack: tuple[HubProcess, LocalIdP]) -> dict[str, requests.Session]:
    hub, idp = stack
    out = {}
    for login in ("alice", "bob", "ivan", "olga"):
        r = oidc_login(hub.url, idp, login)
        assert r.left_deployment is None and r.response.status_code == 200, r.hops
        out[login] = r.session
    return out


def get(hub: HubProcess, s: requests.Session, path: str, **params: str) -> requests.Response:
    return s.get(f"{hub.url}/hub/{path}", params=params, timeout=30, allow_redirects=False)


def cells(html: str, cls: str) -> list[str]:
    return [unescape(m) for m in re.findall(rf'class="{cls}">([^<]*)<', html)]


def test_my_usage_shows_totals_marks_plot_and_the_download_button(
    stack: tuple[HubProcess, LocalIdP], sessions: dict[str, requests.Session]
) -> None:
    hub, _ = stack
    r = get(hub, sessions["alice"], "usage")
    assert r.status_code == 200, r.text[:500]
    html = r.text
    assert "<h1>My usage</h1>" in html
    assert 'href="/hub/home"' in html and 'href="/hub/token"' in html  # the hub's nav bar
    # the last 30 days: 2 h + 1 h at 1 GPU, €2/h, 1000 W, 50 g/kWh; not the 5 h of long ago
    assert cells(html, "sp-gpu-hours") == ["3.00"]
    assert cells(html, "sp-eur") == ["6.00"]
    assert cells(html, "sp-wh") == ["3000.0"]
    assert cells(html, "sp-co2") == ["150.0"]
    assert 'sp-basis">measured<' in html and 'sp-basis">estimated<' in html
    # the plot: server-drawn SVG, one bar per day, two of them non-zero
    svg = re.search(r"<svg .*?</svg>", html, re.S)
    assert svg, html[:2000]
    values = re.findall(r'data-value="([^"]+)"', svg.group(0))
    assert len(values) == 30 and sorted(v for v in values if v != "0") == ["1", "2"]
    assert "<script" not in svg.group(0)
    # sessions: both records, with where they ran
    assert "gpu-de" in html and ">DE<" in html
    assert html.count("<td>stopped") == 2
    assert re.search(r'id="sp-download" href="/hub/usage/export">Download my data<', html)
    archive = sessions["alice"].get(f"{hub.url}/hub/usage/export", timeout=60)  # H3's route
    assert archive.status_code == 200, archive.text[:300]
    assert "attachment" in archive.headers["Content-Disposition"] and ALICE in archive.text
    # a range that reaches back 400 days adds the old record, plotted by month
    start = (datetime.now(UTC).date() - timedelta(days=500)).isoformat()
    r = get(hub, sessions["alice"], "usage", **{"from": start})
    assert r.status_code == 200 and cells(r.text, "sp-gpu-hours") == ["8.00"]
    assert "GPU-hours per month" in r.text


def test_bob_sees_only_his_own(
    stack: tuple[HubProcess, LocalIdP], sessions: dict[str, requests.Session]
) -> None:
    hub, _ = stack
    r = get(hub, sessions["bob"], "usage")
    assert r.status_code == 200 and cells(r.text, "sp-gpu-hours") == ["3.00"]
    assert "gpu-de" not in r.text
    other = get(hub, sessions["bob"], "usage", user=ALICE)
    assert other.status_code == 403
    assert f"read:users!user={ALICE}" in unescape(other.text)


def test_course_page_for_its_instructor_per_student(
    stack: tuple[HubProcess, LocalIdP], sessions: dict[str, requests.Session]
) -> None:
    hub, _ = stack
    r = get(hub, sessions["ivan"], "usage/courses/ml101")
    assert r.status_code == 200, r.text[:500]
    assert cells(r.text, "sp-user") == [ALICE]  # bob is not in ml101
    assert cells(r.text, "sp-gpu-hours") == ["2.00", "2.00"]  # totals, then alice's row
    # an instructor reaches his students' My usage page, not anyone else's
    mine = get(hub, sessions["ivan"], "usage", user=ALICE)
    assert mine.status_code == 200 and "Usage of alice@uni-a.example" in mine.text
    assert "sp-download" not in mine.text  # her archive is for her and the operators
    assert get(hub, sessions["ivan"], "usage", user=BOB).status_code == 403
    # another course, and a student on her own course: 403 with the scope named
    for who, course in (("ivan", "cv202"), ("alice", "ml101"), ("bob", "cv202")):
        denied = get(hub, sessions[who], f"usage/courses/{course}")
        assert denied.status_code == 403, (who, course)
        assert f"read:users!group=course-{course}" in unescape(denied.text)


def test_operator_page_by_partition_site_and_country(
    stack: tuple[HubProcess, LocalIdP], sessions: dict[str, requests.Session]
) -> None:
    hub, _ = stack
    r = get(hub, sessions["olga"], "usage/operator")
    assert r.status_code == 200, r.text[:500]
    html = r.text
    assert cells(html, "sp-partition") == ["gpu-de", "lab"]
    assert cells(html, "sp-country") == ["DE", "FR"]
    assert cells(html, "sp-site") == ["HPC centre DE", "Example University GPU lab"]
    assert cells(html, "sp-gpu-hours") == ["6.00", "1.00", "5.00"]  # totals, then per group
    r = get(hub, sessions["olga"], "usage/operator", by="country")
    assert cells(r.text, "sp-country") == ["DE", "FR"] and cells(r.text, "sp-partition") == []
    # the operator reaches every course page and everyone's usage
    assert get(hub, sessions["olga"], "usage/courses/cv202").status_code == 200
    theirs = get(hub, sessions["olga"], "usage", user=BOB)
    assert theirs.status_code == 200
    assert 'href="/hub/usage/export?user=bob@uni-a.example">Download their data<' in theirs.text
    for who in ("alice", "ivan"):
        denied = get(hub, sessions[who], "usage/operator")
        assert denied.status_code == 403 and "read:users" in denied.text


def test_unknown_course_is_404_for_those_who_may_ask(
    stack: tuple[HubProcess, LocalIdP], sessions: dict[str, requests.Session]
) -> None:
    hub, _ = stack
    r = get(hub, sessions["olga"], "usage/courses/zz999")
    assert r.status_code == 404 and "no course" in r.text
    assert get(hub, sessions["olga"], "usage/courses/..%2Fetc").status_code == 404
    assert get(hub, sessions["olga"], "usage", user="nobody@uni-a.example").status_code == 404


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("usage", {"frm": "2026-01-01"}, "frm"),
        ("usage", {"from": "2026-13-01"}, "from"),
        ("usage", {"from": "2026-12-02", "to": "2026-12-01"}, "from"),
        ("usage", {"step": "hour"}, "step"),
        ("usage", {"from": "2025-06-01", "to": "2026-11-30", "step": "day"}, "step"),
        ("usage", {"by": "partition"}, "by"),
        ("usage/operator", {"by": "user"}, "by"),
        ("usage/operator", {"to": ""}, "to"),
        ("usage/courses/ml101", {"user": ALICE}, "user"),
    ],
)
def test_bad_query_parameters_are_400_naming_them(
    stack: tuple[HubProcess, LocalIdP],
    sessions: dict[str, requests.Session],
    path: str,
    params: dict[str, str],
    field: str,
) -> None:
    hub, _ = stack
    r = get(hub, sessions["olga"], path, **params)
    assert r.status_code == 400, r.text[:300]
    assert f"{field}:" in unescape(r.text)


def test_without_login_the_pages_send_you_to_log_in(stack: tuple[HubProcess, LocalIdP]) -> None:
    hub, _ = stack
    for path in ("usage", "usage/operator", "usage/courses/ml101"):
        r = requests.get(f"{hub.url}/hub/{path}", allow_redirects=False, timeout=30)
        assert r.status_code == 302 and "/hub/login" in r.headers["Location"], path
