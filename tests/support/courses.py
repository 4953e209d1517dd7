"""The course tests' rig on the real portal, written once: the course, RBAC, page and
class-start tests all log the people of ``idp_users.COURSE_USERS`` into a hub that
``hub.portal.configure()`` sets up with course options.

- :func:`u`: a login's hub user name (``<login>@uni-a.example``);
- :func:`course`: a course body for the course API, valid unless ``over`` says otherwise;
- :func:`course_hub` (context manager): the IdP with the course users and the hub with
  ``courses=...`` given to ``configure()``, the portal service answering; stopped by PID
  afterwards, the egress log checked;
- :class:`CourseStack`: full OIDC logins (a browser session and an API token per person),
  the course API, the hub API and the hub's pages with that person's credentials, and
  the portal database's ledger records and budget charges of a person's server.
  Subclass it for a test file's own reads (its class view).

A module-scoped fixture::

    @pytest.fixture(scope="module")
    def stack(tmp_path_factory):
        with course_hub(tmp_path_factory.mktemp("c"), {"data_root": "/d"}) as (hub, idp):
            st = CourseStack(hub, idp)
            st.create_courses(course("ml101"), course("cv202", instructors=[u("igor")]))
            st.login_all("ines", "s1")
            yield st
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests

from .hub import HubProcess
from .idp import LocalIdP, oidc_login
from .idp_users import COURSE_USERS, write_users
from .portal import configure_text, wait_portal_service
from .stack import HubConfig, hub_with_idp

ORG = "uni-a.example"
#: the portal service's course API behind the proxy
SVC = "/services/sovereign-portal/api/courses"
TODAY = datetime.now(UTC).date()
#: the hidden _xsrf field of a hub page's form
XSRF = re.compile(r'name="_xsrf" value="([^"]+)"')
#: the operator, a sample user of the IdP (no password of the ``pass-<login>`` kind)
OPERATOR = "olga"


def u(login: str) -> str:
    return f"{login}@{ORG}"


def course(cid: str, **over: Any) -> dict[str, Any]:
    """A course of ines's, open since yesterday for 30 days, two sizes, a pool of 40
    GPU-hours (4 a student) and a class on Tuesdays; ``over`` replaces top-level fields."""
    base: dict[str, Any] = {
        "id": cid,
        "title": f"Course {cid}",
        "instructors": [u("ines")],
        "sizes": ["h100:1g.10gb", "h100:3g.40gb"],
        "budget": {"unit": "gpu_hours", "pool": 40, "per_student": 4},
        "start": str(TODAY - timedelta(days=1)),
        "end": str(TODAY + timedelta(days=30)),
        "schedule": [{"weekday": "tue", "time": "09:15", "minutes": 90}],
    }
    return {**base, **over}


def courses_config(courses: dict[str, Any]) -> HubConfig:
    """The operator's ``configure()`` call for the hub and IdP, with ``courses=courses``."""

    def text(hub: HubProcess, idp: LocalIdP) -> str:
        base = configure_text(hub, idp)
        marker = '    inventory_source="declared",\n)'
        assert marker in base
        return base.replace(
            marker, f'    inventory_source="declared",\n    courses={courses!r},\n)'
        )

    return text


@contextmanager
def course_hub(
    workdir: Path, courses: dict[str, Any], *, users: list[dict[str, Any]] | None = None
) -> Iterator[tuple[HubProcess, LocalIdP]]:
    """The IdP with ``users`` (default: ``COURSE_USERS``) besides its sample users, and the
    hub of :func:`courses_config`, once the portal service answers behind the proxy.

    :func:`~.stack.hub_with_idp` stops both by PID afterwards and asserts the egress
    guard's log is empty."""
    users_file = write_users(workdir / "users.json", COURSE_USERS if users is None else users)
    with hub_with_idp(workdir, courses_config(courses), idp_kw={"users_file": users_file}) as (
        hub,
        idp,
    ):
        wait_portal_service(hub)
        yield hub, idp


class CourseStack:
    """The people of a course hub, each logged in once through the real IdP.

    ``sessions[login]`` is their browser session (cookies of the hub), ``tokens[login]``
    an API token of theirs that inherits their scopes (made at their first login)."""

    #: seconds a request of the rig may take
    timeout: float = 60
    #: the note of the API tokens the rig makes
    token_note = "course tests"

    def __init__(self, hub: HubProcess, idp: LocalIdP) -> None:
        self.hub, self.idp = hub, idp
        self.sessions: dict[str, requests.Session] = {}
        self.tokens: dict[str, str] = {}

    def login(self, login: str) -> requests.Session:
        """A full OIDC login of ``login`` (again, if they had one): their new session."""
        password = None if login == OPERATOR else f"pass-{login}"
        result = oidc_login(self.hub.url, self.idp, login, password)
        assert result.left_deployment is None and result.response.status_code == 200, (
            login,
            result.response.status_code,
            result.response.text[:300],
        )
        self.sessions[login] = result.session
        if login not in self.tokens:
            r = self.hub.api(
                "POST",
                f"/users/{u(login)}/tokens",
                json={"scopes": ["inherit"], "note": self.token_note},
            )
            assert r.status_code == 201, r.text
            self.tokens[login] = r.json()["token"]
        return result.session

    def login_all(self, *logins: str) -> None:
        for login in logins:
            self.login(login)

    def create_courses(self, *bodies: dict[str, Any], by: str = OPERATOR) -> None:
        """``by`` (logged in first if not yet) creates each course: 201 or the test fails."""
        if by not in self.tokens:
            self.login(by)
        for body in bodies:
            r = self.portal(by, "POST", "", json=body)
            assert r.status_code == 201, r.text

    def portal(self, who: str, method: str, path: str, **kw: Any) -> requests.Response:
        """The course API at ``SVC + path`` with ``who``'s token."""
        return requests.request(
            method,
            f"{self.hub.url}{SVC}{path}",
            headers={"Authorization": f"token {self.tokens[who]}", **kw.pop("headers", {})},
            timeout=self.timeout,
            **kw,
        )

    def roster_file(self, who: str, cid: str, data: bytes) -> requests.Response:
        """``who`` uploads ``data`` as course ``cid``'s roster file (CSV, ``identifier``)."""
        return self.portal(
            who, "POST", f"/{cid}/roster", data=data, headers={"Content-Type": "text/csv"}
        )

    def hubapi(self, who: str, method: str, path: str, **kw: Any) -> requests.Response:
        """JupyterHub's REST API with ``who``'s token (``hub.api`` without one is admin)."""
        return self.hub.api(method, path, token=self.tokens[who], **kw)

    def groups(self, login: str) -> list[str]:
        r = self.hub.api("GET", f"/users/{u(login)}")
        assert r.status_code == 200, r.text
        return sorted(r.json()["groups"])

    def server(self, login: str) -> dict[str, Any] | None:
        """The hub's model of ``login``'s default server, None if they have none."""
        r = self.hub.api("GET", f"/users/{u(login)}")
        assert r.status_code == 200, r.text
        got: dict[str, Any] | None = (r.json().get("servers") or {}).get("")
        return got

    def db(self) -> sqlite3.Connection:
        """A connection to the hub's portal database (``portal.sqlite``), rows by name."""
        conn = sqlite3.connect(self.hub.dir / "portal.sqlite")
        conn.row_factory = sqlite3.Row
        return conn

    def records(self, login: str) -> list[sqlite3.Row]:
        """The ledger records of ``login``'s default server, oldest first."""
        return self._of_server(
            "SELECT * FROM ledger_records WHERE source = ? ORDER BY opened_at", login
        )

    def charges(self, login: str) -> list[sqlite3.Row]:
        """The budget charges of ``login``'s default server, oldest first."""
        return self._of_server(
            "SELECT * FROM budget_charges WHERE ref = ? ORDER BY created_at", login
        )

    def _of_server(self, sql: str, login: str) -> list[sqlite3.Row]:
        with self.db() as conn:
            return list(conn.execute(sql, (f"server:{u(login)}/",)))

    def page(self, who: str, path: str) -> requests.Response:
        """The hub page ``/hub/<path>`` in ``who``'s browser session."""
        return self.sessions[who].get(f"{self.hub.url}/hub/{path}", timeout=self.timeout)

    def xsrf(self, who: str, path: str) -> str:
        """The _xsrf value of the form on ``who``'s page ``/hub/<path>``."""
        got = self.page(who, path)
        m = XSRF.search(got.text)
        assert m, (got.status_code, got.text[:500])
        return m.group(1)

    def post(self, who: str, path: str, data: dict[str, str], **kw: Any) -> requests.Response:
        """Submit a form of the page at ``path`` as a browser would (its own _xsrf)."""
        return self.sessions[who].post(
            f"{self.hub.url}/hub/{path}",
            data={**data, "_xsrf": self.xsrf(who, path)},
            timeout=self.timeout,
            **kw,
        )
