"""Slurm accounting holds no portal user name (GDPR, issue 11), checked on the real
slurmdbd + MariaDB cluster: a server job submitted exactly as the portal submits it (its
batch script exports the hub user name to the job, as a real spawn does) leaves neither the
hub user name nor its URL-quoted form in sacct's record of it nor anywhere in the
accounting database (a full dump). The Unix account (``spalice``) is the site's, not the
portal's, and is expected there."""

from __future__ import annotations

import subprocess
import time
from datetime import datetime, timedelta

import pytest
from sovereign_portal.spawners.request import parse_request, resolve
from sovereign_portal.spawners.site import load_site
from sovereign_portal.spawners.slurm.jobscript import JobSpec, make_tag, render_script

from tests.support.slurm_cluster import SITE_FILE, SlurmCluster

pytestmark = pytest.mark.slurm

HUB_USER = "alice@uni-a.example"
FORMS = (HUB_USER, "alice%40uni-a.example")


def test_a_portal_job_leaves_no_hub_user_name_in_accounting(
    slurm_accounting_cluster: SlurmCluster,
) -> None:
    c = slurm_accounting_cluster
    resolved = resolve(load_site(SITE_FILE), parse_request({"partition": "gpu-fr", "gpus": 1}))
    spec = JobSpec(
        resolved=resolved,
        unix_user="spalice",
        tag=make_tag(b"k", "0123456789ab"),
        home="/tmp",
        python="/bin/true",  # the launcher line runs and exits at once
        token_file="/tmp/no-token",
        output="/dev/null",
        env={"JUPYTERHUB_USER": HUB_USER, "JUPYTERHUB_SERVICE_PREFIX": f"/user/{FORMS[1]}/"},
    )
    script = render_script(spec)
    assert HUB_USER in script  # the job itself knows whose server it is
    since = datetime.now().replace(microsecond=0) - timedelta(seconds=2)  # sacct: local time
    r = c.run(["sbatch", "--parsable"], user="spalice", input=script)
    job = r.stdout.strip().split(";")[0]
    fields = "JobID,JobName,Comment,SubmitLine,WorkDir,User,Submit,State"
    deadline, row = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        # the accounting database outlives the cluster's job ids: take this submission's row
        out = c.run(
            ["sacct", "-X", "-n", "-P", "-j", job, "-S", since.isoformat(), "-o", fields],
            check=False,
        ).stdout
        mine = [
            line for line in out.splitlines()
            if line.startswith(job + "|") and datetime.fromisoformat(line.split("|")[6]) >= since
        ]  # fmt: skip
        row = mine[-1] if mine else ""
        if row and row.split("|")[1] == "sovereign-portal" and row.split("|")[-1] not in (
            "PENDING", "RUNNING", "",
        ):  # fmt: skip
            break
        time.sleep(0.5)
    assert row, f"job {job} never reached sacct: {out}"
    name, _comment, _submit, _workdir, user = row.split("|")[1:6]
    # (slurmdbd first shows a fast job as "allocation" until its name reaches it: waited for)
    assert name == "sovereign-portal" and user == "spalice", row
    assert not [f for f in FORMS if f in row], row
    dump = subprocess.run(
        ["mariadb-dump", f"--defaults-file={c.acct.cnf}", "--all-databases", "--skip-comments"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dump.returncode == 0, dump.stderr
    assert "spalice" in dump.stdout  # the dump is the real one: it holds the Unix account
    assert not [f for f in FORMS if f in dump.stdout]
