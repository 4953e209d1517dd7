"""The scheduler client's CLI transport and the poller, against scripted commands.

Fast inner layer: each Slurm command is a small script on PATH that records its argv and
prints a scripted answer. The real-Slurm layer is tests/hub/test_scheduler_poll.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import pytest
from sovereign_portal.spawners.slurm.client import (
    GONE,
    CallTimeout,
    JobInfo,
    SchedulerError,
    SchedulerUnavailable,
    SlurmCLI,
    SlurmError,
    call,
    parse_scontrol,
    queue_positions,
)
from sovereign_portal.spawners.slurm.scheduler import JobPoller

pytestmark = pytest.mark.unit


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def _wait_gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _pid_gone(pid):
            return True
        time.sleep(0.02)
    return False


def test_a_call_past_its_timeout_kills_its_child_and_grandchild(tmp_path: Path) -> None:
    """The command (a stand-in for ``runuser -- sbatch``: a parent that forks a child and
    waits) is killed with its whole process group; no PID is left."""
    pids = tmp_path / "pids"
    exe = tmp_path / "slow"
    exe.write_text(f"#!/bin/sh\nsleep 300 &\necho $$ $! > {pids}\nwait\n")
    exe.chmod(0o755)

    async def run() -> None:
        with pytest.raises(TimeoutError):
            await call([str(exe)], timeout=1.0)

    t0 = time.monotonic()
    asyncio.run(run())
    assert time.monotonic() - t0 < 5
    parent, child = (int(p) for p in pids.read_text().split())
    assert _wait_gone(parent), f"parent {parent} still runs"
    assert _wait_gone(child), f"grandchild {child} still runs"


def test_a_call_past_its_timeout_keeps_what_it_said_and_submit_is_unavailable(
    tmp_path: Path,
) -> None:
    """sbatch as a user who cannot read slurm.conf retries for 60 s: the timeout keeps its
    stderr (the reason, for the log), and a submit that got no answer is "unavailable"
    (the job may exist), never a bare TimeoutError nor a refusal."""
    exe = tmp_path / "sbatch"
    exe.write_text(
        "#!/bin/sh\ncat > /dev/null\n"
        "echo 'sbatch: error: s_p_parse_file: cannot stat file /x/slurm.conf: Permission "
        "denied, retrying in 1sec up to 60sec' >&2\nexec sleep 300\n"
    )
    exe.chmod(0o755)

    async def run() -> None:
        with pytest.raises(CallTimeout) as e:
            await call([str(exe)], input="#!/bin/sh\n", timeout=1.0)
        assert "Permission denied, retrying" in e.value.stderr
        assert "did not answer within 1 s; it said: sbatch: error:" in str(e.value)
        cli = SlurmCLI(sbatch=str(exe), timeout=1.0)
        with pytest.raises(SchedulerUnavailable) as u:
            await cli.submit("#!/bin/sh\n")
        assert "cannot stat file /x/slurm.conf: Permission denied" in str(u.value)
        assert isinstance(u.value.__cause__, TimeoutError)

    asyncio.run(run())


def test_a_cancelled_call_kills_its_child(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    exe = tmp_path / "slow"
    exe.write_text(f"#!/bin/sh\necho $$ > {pids}\nexec sleep 300\n")
    exe.chmod(0o755)

    async def run() -> None:
        task = asyncio.ensure_future(call([str(exe)], timeout=60))
        for _ in range(250):  # the script wrote its PID
            if pids.exists() and pids.read_text().strip():
                break
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert _wait_gone(int(pids.read_text()))


def test_a_failing_call_raises_with_exit_code_and_stderr(tmp_path: Path) -> None:
    exe = tmp_path / "bad"
    exe.write_text("#!/bin/sh\necho out; echo 'it broke' >&2; exit 3\n")
    exe.chmod(0o755)
    with pytest.raises(SlurmError) as e:
        asyncio.run(call([str(exe)]))
    assert e.value.returncode == 3 and "it broke" in e.value.stderr and e.value.stdout == "out\n"


def _fake_slurm(tmp_path: Path, answers: dict[str, str]) -> dict[str, str]:
    """sbatch/squeue/scancel/scontrol/sinfo scripts that log argv (and stdin) and answer."""
    for name, answer in answers.items():
        (tmp_path / f"{name}.out").write_text(answer)
        exe = tmp_path / name
        exe.write_text(
            "#!/bin/sh\n"
            f'echo "$@" >> {tmp_path}/{name}.argv\n'
            f"[ {name} = sbatch ] && cat > {tmp_path}/sbatch.stdin\n"
            f'A=$(cat {tmp_path}/{name}.out)\ncase "$A" in ERR:*) echo "${{A#ERR:}}" >&2;'
            " exit 1;; esac\n"
            'echo "$A"\n'
        )
        exe.chmod(0o755)
    return {"PATH": f"{tmp_path}:/usr/bin:/bin"}


def _argv(tmp_path: Path, name: str) -> list[str]:
    return (tmp_path / f"{name}.argv").read_text().splitlines()


def test_cli_submit_passes_the_script_on_stdin_and_runs_as_the_user(tmp_path: Path) -> None:
    env = _fake_slurm(tmp_path, {"sbatch": "4242;cluster", "runas": ""})
    # a prefix command that runs the rest of argv (as runuser would, as another user)
    (tmp_path / "runas").write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/runas.argv\nshift 2\nexec "$@"\n'
    )
    cli = SlurmCLI(env=env, submit_prefix=[str(tmp_path / "runas"), "-u", "{unix_user}"])
    job = asyncio.run(cli.submit("#!/bin/sh\n#SBATCH -p gpu\n", ["--hold"], user="spalice"))
    assert job == "4242"
    assert _argv(tmp_path, "runas") == ["-u spalice sbatch --parsable --hold"]
    assert (tmp_path / "sbatch.stdin").read_text() == "#!/bin/sh\n#SBATCH -p gpu\n"


def test_cli_submit_refuses_an_answer_that_is_not_a_job_id(tmp_path: Path) -> None:
    env = _fake_slurm(tmp_path, {"sbatch": "Submitted; rm -rf"})
    with pytest.raises(SchedulerError, match="not a job id"):
        asyncio.run(SlurmCLI(env=env).submit("#!/bin/sh\n"))


def test_cli_cancel_of_an_ended_job_is_no_error_and_bad_ids_run_nothing(tmp_path: Path) -> None:
    env = _fake_slurm(
        tmp_path, {"scancel": "ERR:scancel: error: Kill job error on job id 5: Invalid job id"}
    )
    cli = SlurmCLI(env=env)
    asyncio.run(cli.cancel(["5"]))
    assert _argv(tmp_path, "scancel") == ["5"]
    with pytest.raises(SchedulerError, match="not Slurm job ids"):
        asyncio.run(cli.cancel(["5; reboot"]))
    assert _argv(tmp_path, "scancel") == ["5"]  # nothing more ran
    (tmp_path / "scancel.out").write_text("ERR:scancel: error: Access/permission denied")
    with pytest.raises(SlurmError, match="permission denied"):
        asyncio.run(cli.cancel(["6"]))


def test_cli_query_is_one_batched_squeue(tmp_path: Path) -> None:
    env = _fake_slurm(
        tmp_path,
        {"squeue": "7|PENDING|Resources|||u|gpu-fr|10|\n8|RUNNING|None|h100-a|N/A|u|gpu-fr|5|"},
    )
    cli = SlurmCLI(env=env)
    jobs = asyncio.run(cli.query(["8", "7"]))
    assert set(jobs) == {"7", "8"} and jobs["7"].reason == "Resources"
    asyncio.run(cli.query())
    asyncio.run(cli.query(name="sovereign-portal"))
    fmt = "-o %i|%T|%r|%N|%S|%u|%P|%Q;%b;%D|%k"
    assert _argv(tmp_path, "squeue") == [
        f"-h -t all --jobs=7,8 {fmt}",
        f"-h -t all {fmt}",
        f"-h -t all --name=sovereign-portal {fmt}",
    ]
    with pytest.raises(SchedulerError):
        asyncio.run(cli.query(["7,8"]))
    (tmp_path / "squeue.out").write_text("ERR:slurm_load_jobs error: Invalid job id specified")
    assert asyncio.run(cli.query(["9"])) == {}  # authoritative: gone
    (tmp_path / "squeue.out").write_text("ERR:slurm_load_jobs error: Unable to contact slurm")
    with pytest.raises(SchedulerError):
        asyncio.run(cli.query(["9"]))


def test_cli_job_detail_and_nodes(tmp_path: Path) -> None:
    env = _fake_slurm(
        tmp_path,
        {
            "scontrol": "JobId=5 JobName=x y UserId=spalice(1001) JobState=PENDING "
            "Reason=Resources Command=/bin/sh -c true",
            "sinfo": "h100-a|10.0.0.1|gpu:h100:8(S:0)\nmig-a|mig-a|gpu:a:2,gpu:b:7",
        },
    )
    cli = SlurmCLI(env=env)
    d = asyncio.run(cli.job_detail("5"))
    assert d["JobName"] == "x y" and d["JobState"] == "PENDING"
    assert d["Command"] == "/bin/sh -c true"
    nodes = asyncio.run(cli.nodes("gpu-fr"))
    assert nodes["h100-a"].addr == "10.0.0.1" and nodes["mig-a"].gres == ("gpu:a:2", "gpu:b:7")
    assert _argv(tmp_path, "sinfo") == ["-h -N -p gpu-fr -o %N|%o|%G"]
    with pytest.raises(SchedulerError):
        asyncio.run(cli.job_detail("5 6"))
    assert parse_scontrol("") == {}


def _job(jid: str, state: str, part: str = "gpu-fr", prio: int = 0) -> JobInfo:
    return JobInfo(jid, state, "Priority", "", "", "u", "", part, prio)


@pytest.mark.parametrize(
    ("jobs", "expected"),
    [
        ([], {}),
        ([_job("5", "RUNNING")], {}),
        ([_job("5", "PENDING"), _job("3", "PENDING")], {"3": 1, "5": 2}),  # by job number
        ([_job("3", "PENDING", prio=1), _job("5", "PENDING", prio=9)], {"5": 1, "3": 2}),
        ([_job("3", "PENDING"), _job("5", "PENDING", part="gpu-de")], {"3": 1, "5": 1}),
        ([_job("10_2", "PENDING"), _job("9", "PENDING")], {"9": 1, "10_2": 2}),
    ],
)
def test_queue_positions(jobs: list[JobInfo], expected: dict[str, int]) -> None:
    assert queue_positions({j.job_id: j for j in jobs}) == expected


def test_whole_queue_poller_keeps_the_queue_positions_and_tells_listeners(
    tmp_path: Path,
) -> None:
    env = _fake_slurm(
        tmp_path,
        {"squeue": "7|PENDING|Resources|||u|gpu-fr|10|\n8|PENDING|Priority|||v|gpu-fr|50|"},
    )
    told: list[bool] = []

    async def run() -> JobPoller:
        poller = JobPoller(interval=60, client=SlurmCLI(env=env), whole_queue=True)
        poller.listeners.append(told.append)
        assert await poller.refresh()  # polls with nothing tracked: the queue state
        poller.tracked.update({"7", "99"})
        assert await poller.refresh()
        (tmp_path / "squeue.out").write_text("ERR:down")
        assert not await poller.refresh()
        return poller

    poller = asyncio.run(run())
    assert told == [True, True, False]
    assert poller.positions == {"8": 1, "7": 2}
    assert poller.info("99") is GONE and poller.info("7") is not None
    assert _argv(tmp_path, "squeue")[0] == "-h -t all -o %i|%T|%r|%N|%S|%u|%P|%Q;%b;%D|%k"
