"""The slurmrestd transport (spawners/slurm/rest.py) against handwritten v0.0.38 JSON.

Fast inner layer: a small HTTP server on 127.0.0.1 in this process answers as slurmrestd
22.05 does (shapes taken from a real slurmrestd's answers), and records each request's
method, path and headers. The real slurmrestd layer is tests/hub/test_sites_rest.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from sovereign_portal.spawners.slurm.client import (
    SchedulerError,
    SchedulerUnavailable,
    parse_squeue,
)
from sovereign_portal.spawners.slurm.rest import (
    RESTConfigError,
    SlurmREST,
    check_url,
    directives,
    job_properties,
    parse_jobs,
    token_user,
)

pytestmark = pytest.mark.unit

JOBS: dict[str, Any] = {
    "meta": {"plugin": {"type": "openapi/v0.0.38"}},
    "errors": [],
    "jobs": [
        {
            "job_id": 41,
            "name": "sovereign-portal",
            "job_state": "RUNNING",
            "state_reason": "None",
            "nodes": "h100-a",
            "start_time": 1764590000,
            "user_name": "spalice",
            "comment": "sovereign-portal:tag1 port=8888",
            "partition": "gpu",
            "priority": 4294901759,
            "tres_per_node": "gres:gpu:h100:2",
            "node_count": 1,
        },
        {
            "job_id": 42,
            "name": "sovereign-portal",
            "job_state": "PENDING",
            "state_reason": "Resources",
            "nodes": "",
            "start_time": 0,
            "user_name": "spbob",
            "comment": "",
            "partition": "gpu",
            "priority": 4294901758,
        },
        {
            "job_id": 43,
            "name": "other",
            "job_state": "CANCELLED",
            "state_reason": "None",
            "nodes": "h100-a",
            "start_time": 1764590100,
            "user_name": "spbob",
            "comment": "",
            "partition": "gpu",
            "priority": 1,
        },
    ],
}


class Canned:
    """What the fake slurmrestd answers, and what it was asked."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers: dict[tuple[str, str], tuple[int, Any]] = {}


@pytest.fixture
def restd() -> Iterator[tuple[str, Canned]]:
    canned = Canned()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            canned.requests.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                }
            )
            code, data = canned.answers.get((self.command, self.path), (404, {"errors": []}))
            raw = json.dumps(data).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *a: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", canned
    finally:
        server.shutdown()
        server.server_close()


def _token(tmp_path: Path, user: str = "slurm", mode: int = 0o600) -> Path:
    tok = jwt.encode({"sun": user, "exp": 2_000_000_000, "iat": 1}, b"k" * 32, "HS256")
    p = tmp_path / "site.jwt"
    p.write_text(tok + "\n")
    p.chmod(mode)
    return p


def test_the_whole_queue_maps_to_the_same_job_infos_as_squeue(
    restd: tuple[str, Canned], tmp_path: Path
) -> None:
    url, canned = restd
    canned.answers[("GET", "/slurm/v0.0.38/jobs")] = (200, JOBS)
    client = SlurmREST(url, _token(tmp_path))
    jobs = asyncio.run(client.query(None))
    assert sorted(jobs) == ["41", "42", "43"]
    # The same fields squeue -o SQUEUE_FORMAT gives for these jobs.
    start = jobs["41"].start
    line = (
        f"41|RUNNING|None|h100-a|{start}|spalice|gpu|4294901759;gres:gpu:h100:2;1|"
        "sovereign-portal:tag1 port=8888"
    )
    assert jobs["41"] == parse_squeue(line)["41"]
    assert jobs["42"].state == "PENDING" and jobs["42"].reason == "Resources"
    assert jobs["42"].start == "N/A" and jobs["42"].start_estimate is None
    assert jobs["43"].ended and not jobs["41"].ended
    assert jobs["41"].devices == 2 and jobs["42"].devices == 0
    # One call for the whole queue; job ids and names filter its answer.
    assert asyncio.run(client.query(["42", "99"])).keys() == {"42"}
    assert asyncio.run(client.query(name="sovereign-portal")).keys() == {"41", "42"}
    assert asyncio.run(client.query([])) == {}
    assert [r["path"] for r in canned.requests] == ["/slurm/v0.0.38/jobs"] * 3


def test_the_token_travels_only_in_its_header(restd: tuple[str, Canned], tmp_path: Path) -> None:
    url, canned = restd
    canned.answers[("GET", "/slurm/v0.0.38/jobs")] = (200, JOBS)
    tf = _token(tmp_path, "slurm")
    token = tf.read_text().strip()
    client = SlurmREST(url, tf)
    asyncio.run(client.query(None))
    req = canned.requests[0]
    assert req["headers"]["x-slurm-user-token"] == token
    assert req["headers"]["x-slurm-user-name"] == "slurm"  # the token's own user
    assert token not in req["path"] and token not in repr(client)
    assert "authorization" not in req["headers"]


def test_submit_sends_the_script_and_its_sbatch_lines_as_job_properties(
    restd: tuple[str, Canned], tmp_path: Path
) -> None:
    url, canned = restd
    canned.answers[("POST", "/slurm/v0.0.38/job/submit")] = (
        200,
        {"errors": [], "job_id": 77, "step_id": "BATCH", "job_submit_user_msg": ""},
    )
    script = (
        "#!/bin/bash\n# a comment\n#SBATCH --job-name=sovereign-portal\n"
        "#SBATCH --comment=sovereign-portal:abc\n#SBATCH --partition=gpu\n"
        "#SBATCH --nodes=1\n#SBATCH --gres=gpu:h100:2\n#SBATCH --exclusive\n"
        "#SBATCH --time=90\n#SBATCH --chdir=/home/spalice\n#SBATCH --export=NONE\n"
        "#SBATCH --no-requeue\n#SBATCH --signal=B:TERM@60\nset -eu\n#SBATCH --qos=late\n"
    )
    client = SlurmREST(url, _token(tmp_path))
    job_id = asyncio.run(client.submit(script, user="spalice", env={"PATH": "/bin"}))
    assert job_id == "77"
    req = canned.requests[0]
    assert req["headers"]["x-slurm-user-name"] == "spalice"  # acts as the job's owner
    assert req["body"]["script"] == script
    assert req["body"]["job"] == {
        "name": "sovereign-portal",
        "comment": "sovereign-portal:abc",
        "partition": "gpu",
        "nodes": 1,
        "gres": "gpu:h100:2",
        "exclusive": "exclusive",
        "time_limit": 90,
        "current_working_directory": "/home/spalice",
        "requeue": False,
        "signal": "TERM@60",  # 22.05's REST parser takes no B: flag
        "environment": {"PATH": "/bin"},
    }  # --qos after the first command is not a directive (as sbatch reads it)


def test_an_sbatch_option_without_a_rest_equivalent_is_refused() -> None:
    with pytest.raises(SchedulerError, match="--wckey=x"):
        job_properties(["--wckey=x"])
    with pytest.raises(SchedulerError, match="bad value"):
        job_properties(["--nodes=two"])
    assert directives("#!/bin/sh\n#SBATCH --time=1-02:30:00\n") == ["--time=1-02:30:00"]
    assert job_properties(["--time=1-02:30:00"])["time_limit"] == 1590
    assert job_properties(["--time=5:30"])["time_limit"] == 6


def test_slurm_errors_are_scheduler_errors_naming_the_call(
    restd: tuple[str, Canned], tmp_path: Path
) -> None:
    url, canned = restd
    err = {
        "errors": [{"error": "Requested node configuration is not available", "error_number": 2014}]
    }
    canned.answers[("POST", "/slurm/v0.0.38/job/submit")] = (500, err)
    client = SlurmREST(url, _token(tmp_path))
    with pytest.raises(SchedulerError, match="configuration is not available") as e:
        asyncio.run(client.submit("#!/bin/sh\n#SBATCH --gres=gpu:h100:9\n", user="spalice"))
    assert "job/submit" in str(e.value) and "k" * 8 not in str(e.value)


def test_cancel_of_a_job_that_is_gone_is_not_an_error(
    restd: tuple[str, Canned], tmp_path: Path
) -> None:
    url, canned = restd
    canned.answers[("DELETE", "/slurm/v0.0.38/job/41")] = (200, {"errors": []})
    # 22.05 answers 500 for an unknown job: the client asks whether it is still listed.
    canned.answers[("DELETE", "/slurm/v0.0.38/job/50")] = (500, {"errors": [{"error": "?"}]})
    canned.answers[("GET", "/slurm/v0.0.38/jobs")] = (200, JOBS)
    client = SlurmREST(url, _token(tmp_path))
    asyncio.run(client.cancel(["41", "50"], user="spalice"))
    assert [(r["method"], r["path"]) for r in canned.requests] == [
        ("DELETE", "/slurm/v0.0.38/job/41"),
        ("DELETE", "/slurm/v0.0.38/job/50"),
        ("GET", "/slurm/v0.0.38/jobs"),
    ]
    canned.answers[("DELETE", "/slurm/v0.0.38/job/42")] = (500, {"errors": [{"error": "denied"}]})
    with pytest.raises(SchedulerError, match="denied"):  # 42 is still pending
        asyncio.run(client.cancel(["42"], user="spalice"))
    with pytest.raises(SchedulerError, match="not Slurm job ids"):
        asyncio.run(client.cancel(["1;2"]))


def test_job_detail_and_nodes(restd: tuple[str, Canned], tmp_path: Path) -> None:
    url, canned = restd
    canned.answers[("GET", "/slurm/v0.0.38/job/41")] = (
        200,
        {"errors": [], "jobs": JOBS["jobs"][:1]},
    )
    canned.answers[("GET", "/slurm/v0.0.38/nodes")] = (
        200,
        {
            "errors": [],
            "nodes": [
                {
                    "name": "h100-a",
                    "address": "10.0.0.5",
                    "gres": "gpu:h100:8(S:0)",
                    "partitions": ["gpu"],
                },
                {"name": "cpu-a", "address": "10.0.0.6", "gres": "", "partitions": ["cpu"]},
            ],
        },
    )
    client = SlurmREST(url, _token(tmp_path))
    d = asyncio.run(client.job_detail("41"))
    assert (d["JobId"], d["JobState"], d["UserId"], d["NodeList"]) == (
        "41",
        "RUNNING",
        "spalice",
        "h100-a",
    )
    nodes = asyncio.run(client.nodes("gpu"))
    assert list(nodes) == ["h100-a"]
    assert nodes["h100-a"].addr == "10.0.0.5" and nodes["h100-a"].gres == ("gpu:h100:8",)


def test_a_site_that_does_not_answer_is_unavailable_not_an_answer(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = SlurmREST(f"http://127.0.0.1:{port}", _token(tmp_path), timeout=2)
    with pytest.raises(SchedulerUnavailable):
        asyncio.run(client.query(None))


def test_bad_endpoints_and_token_files_are_refused_naming_them(tmp_path: Path) -> None:
    with pytest.raises(RESTConfigError, match="plain http is allowed to a loopback"):
        check_url("http://slurm.example.org:6820")
    with pytest.raises(RESTConfigError, match="no credentials"):
        check_url("https://u:p@slurm.example.org")
    assert check_url("https://slurm.example.org:6820/") == "https://slurm.example.org:6820"
    assert check_url("http://[::1]:6820") == "http://[::1]:6820"
    open_file = _token(tmp_path, mode=0o644)
    with pytest.raises(SchedulerError, match=r"token_file .* readable by others"):
        asyncio.run(SlurmREST("http://127.0.0.1:1", open_file).query(None))
    missing = SlurmREST("http://127.0.0.1:1", tmp_path / "nope")
    with pytest.raises(SchedulerError, match=r"token_file .*nope.*cannot read"):
        asyncio.run(missing.query(None))
    with pytest.raises(RESTConfigError, match="sun"):
        token_user(jwt.encode({"exp": 2_000_000_000}, b"k" * 32, "HS256"))


def test_parse_jobs_needs_a_jobs_list() -> None:
    with pytest.raises(SchedulerError, match="no 'jobs' list"):
        parse_jobs({"errors": []})
