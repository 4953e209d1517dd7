"""SlurmGPUSpawner on a scripted Slurm (tests/support/fakes.py): start, poll, stop, failures
and re-adoption, in milliseconds and without a cluster.

This is the fast inner layer. tests/hub/test_slurm_spawner.py runs the same lifecycle
against the real Slurm cluster, and stays the proof. Each test declares the scheduler
commands it expects, with their canned answers. It then checks what the spawner did with
them: what it submitted and as whom, what the hub is told, and what is cancelled or left
alone.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyterhub.spawner import SpawnException
from tornado import web

from tests.support.fakes import (
    ANY,
    EXITS_AT_ONCE,
    NO_SUCH_PROGRAM,
    RUNS,
    ScriptedSlurmSpawner,
    SlurmScript,
    leases,
    local_spawner,
    port_comment,
    sinfo_answer,
    slurm_script,
    squeue_answer,
    submitted_tag,
)

pytestmark = pytest.mark.unit

SBATCH = ["runuser", "-u", "spfake", "--", "sbatch", "--parsable"]
SCANCEL = ["runuser", "-u", "spfake", "--", "scancel", "42"]
SQUEUE_42 = ["squeue", "-h", "-t", "all", "--jobs=42", "-o", ANY]
SINFO_ALL = ["sinfo", "-h", "-N", "-o", ANY]
NODES = sinfo_answer({"h100-a": ("127.0.0.1", "gpu:h100:4"), "h100-b": ("127.0.0.2", "gpu:h100:4")})


@pytest.fixture
def slurm_fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[SlurmScript]:
    """A scripted scheduler and a fake Unix account; every scripted step must be used."""
    script = slurm_script(monkeypatch, tmp_path)
    yield script
    script.commands.assert_done()


@pytest.fixture
def listening() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections: the 'server' in the job."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def script_start(fake: SlurmScript, port: int) -> None:
    """sbatch answers 42; squeue: pending, starting on h100-a, then listening on ``port``."""
    c = fake.commands
    c.expect(SBATCH, "42\n")
    c.expect(SQUEUE_42, squeue_answer({"id": 42, "state": "PENDING", "reason": "Resources"}))
    c.expect(SQUEUE_42, squeue_answer({"id": 42, "state": "RUNNING", "nodes": "h100-a"}))
    running = {"id": 42, "state": "RUNNING", "nodes": "h100-a", "comment": port_comment(port)}
    c.expect(SQUEUE_42, squeue_answer(running), repeat=True)
    c.expect(SINFO_ALL, NODES, repeat=True)


async def started(fake: SlurmScript, port: int, **config: Any) -> ScriptedSlurmSpawner:
    script_start(fake, port)
    sp = fake.spawner(**config)
    assert await fake.commands.run(sp.start()) == ("127.0.0.1", port)
    return sp


def messages(sp: ScriptedSlurmSpawner) -> list[str]:
    return [e["message"] for e in sp._events]


# -- start ----------------------------------------------------------------------------------------
def test_start_submits_as_the_user_and_follows_the_queue_to_the_port(
    slurm_fake: SlurmScript, listening: int
) -> None:
    async def run() -> ScriptedSlurmSpawner:
        return await started(slurm_fake, listening)

    sp = asyncio.run(run())
    (submit,) = slurm_fake.commands.ran("sbatch")
    assert submit.argv == SBATCH and submit.cwd == str(slurm_fake.account.home)
    script = submit.input or ""
    assert "#SBATCH --partition=gpu-fr" in script and "#SBATCH --gres=gpu:h100:1" in script
    assert sp.api_token not in script and "TOKEN" not in script
    assert all(sp.api_token not in " ".join(c.argv) for c in slurm_fake.commands.calls)
    assert set(submit.env or {}) <= {"PATH", "LANG", "SLURM_CONF"}  # nothing of the hub's env
    # The token is in a new 0600 file of the user's, named by the job's tag.
    tag = submitted_tag(slurm_fake.commands)
    token = slurm_fake.account.home / ".sovereign-portal" / "tokens" / tag
    st = token.stat()
    assert token.read_text() == sp.api_token and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == slurm_fake.account.entry.pw_uid
    said = messages(sp)
    assert said[1:] == [
        "Submitted as Slurm job 42; waiting in the queue",
        "Queued in gpu-fr: Resources",
        "Starting on node h100-a",
        f"Server listening on h100-a:{listening}; connecting",
    ]
    assert sp.get_state()["job_id"] == "42" and sp.get_state()["job_tag"] == tag
    assert sp.get_state()["job_host"] == "127.0.0.1"  # Slurm's NodeAddr, not the job's word


def test_squeue_failing_during_start_is_waited_out(slurm_fake: SlurmScript, listening: int) -> None:
    """A scheduler that stops answering for a while is unknown, not a failed spawn."""
    c = slurm_fake.commands
    c.expect(SBATCH, "42\n")
    c.expect(SQUEUE_42, stderr="slurm_load_jobs error: Socket timed out", returncode=1)
    c.expect(SQUEUE_42, hang=True)
    running = {"id": 42, "state": "RUNNING", "nodes": "h100-a", "comment": port_comment(listening)}
    c.expect(SQUEUE_42, squeue_answer(running), repeat=True)
    c.expect(SINFO_ALL, NODES, repeat=True)

    async def run() -> tuple[str, int]:
        sp = slurm_fake.spawner()
        return await c.run(sp.start())

    assert asyncio.run(run()) == ("127.0.0.1", listening)
    assert not c.ran("scancel")


@pytest.mark.parametrize(
    ("stderr", "status", "says"),
    [
        (
            "sbatch: error: Batch job submission failed: Requested node configuration is "
            "not available",
            400,
            "Slurm can never run 1 H100 GPU (80 GB) on gpu-fr. "
            "Slurm partition 'gpu-fr' has: gpu:h100:4",
        ),
        (
            "sbatch: error: Batch job submission failed: Invalid account or "
            "account/partition combination specified",
            400,
            "Slurm can never run",
        ),
        (
            "sbatch: error: Batch job submission failed: Socket timed out on send/recv",
            500,
            "Slurm refused the job: sbatch: error: Batch job submission failed: Socket timed out",
        ),
    ],
)
def test_sbatch_rejected_fails_the_spawn_and_leaves_nothing(
    slurm_fake: SlurmScript, stderr: str, status: int, says: str
) -> None:
    c = slurm_fake.commands
    c.expect(SBATCH, stderr=stderr, returncode=1)
    if status == 400:  # the message says what the partition has
        c.expect(["sinfo", "-h", "-N", "-p", "gpu-fr", "-o", ANY], NODES)

    async def run() -> ScriptedSlurmSpawner:
        sp = slurm_fake.spawner()
        with pytest.raises(SpawnException) as e:
            await c.run(sp.start())
        assert e.value.status_code == status, e.value
        assert says in e.value.message
        return sp

    sp = asyncio.run(run())
    tokens = slurm_fake.account.home / ".sovereign-portal" / "tokens"
    assert list(tokens.iterdir()) == []  # the token file went with the refused job
    assert sp.get_state().get("job_id") is None and not sp.poller.tracked
    assert not c.ran("squeue") and not c.ran("scancel")


@pytest.mark.parametrize("made_a_job", [True, False])
def test_sbatch_that_never_answers_is_a_clear_503_and_its_job_is_cancelled(
    slurm_fake: SlurmScript, made_a_job: bool
) -> None:
    """sbatch killed at the client's timeout (a controller that does not answer, users who
    cannot read slurm.conf): the student reads that Slurm did not answer, never an empty
    "Spawn failed" (a bare TimeoutError, which JupyterHub also logs as its own start
    timeout); a job the submission made after all is found by its tag and cancelled."""
    c = slurm_fake.commands
    c.expect(SBATCH, hang=True)
    other = {"id": 41, "state": "RUNNING", "comment": "sovereign-portal:someoneelse"}
    ours = {
        "id": 42,
        "state": "PENDING",
        "comment": lambda s: f"sovereign-portal:{submitted_tag(s)}",
    }
    jobs = [other, ours] if made_a_job else [other]
    c.expect(
        ["squeue", "-h", "-t", "all", "--name=sovereign-portal", "-o", ANY], squeue_answer(*jobs)
    )
    if made_a_job:
        c.expect(SCANCEL)

    async def run() -> ScriptedSlurmSpawner:
        sp = slurm_fake.spawner()
        with pytest.raises(SpawnException) as e:
            await c.run(sp.start())
        assert e.value.status_code == 503, e.value
        assert e.value.message.startswith("Slurm did not answer in time, so no server was started")
        assert "did not answer within" in str(e.value.log_message)
        return sp

    sp = asyncio.run(run())
    assert [x.argv for x in c.ran("scancel")] == ([SCANCEL] if made_a_job else [])
    assert list((slurm_fake.account.home / ".sovereign-portal" / "tokens").iterdir()) == []
    assert sp.get_state().get("job_id") is None and not sp.poller.tracked


def test_job_that_ends_before_its_server_starts_fails_the_spawn(slurm_fake: SlurmScript) -> None:
    c = slurm_fake.commands
    c.expect(SBATCH, "42\n")
    c.expect(
        SQUEUE_42, squeue_answer({"id": 42, "state": "FAILED", "nodes": "h100-a"}), repeat=True
    )
    c.expect(
        SCANCEL, stderr="scancel: error: Kill job error on job id 42: Invalid job id", returncode=1
    )

    async def run() -> None:
        sp = slurm_fake.spawner()
        with pytest.raises(SpawnException) as e:
            await c.run(sp.start())
        msg = e.value.message
        assert "job 42 ended before the server started: the job failed" in msg
        assert str(slurm_fake.account.home / ".sovereign-portal/logs/slurm-%j.log") in msg

    asyncio.run(run())
    assert list((slurm_fake.account.home / ".sovereign-portal" / "tokens").iterdir()) == []


def test_a_pending_reason_that_can_never_run_cancels_the_job(slurm_fake: SlurmScript) -> None:
    c = slurm_fake.commands
    c.expect(SBATCH, "42\n")
    never = {"id": 42, "state": "PENDING", "reason": "PartitionNodeLimit"}
    c.expect(SQUEUE_42, squeue_answer(never), repeat=True)
    c.expect(["sinfo", "-h", "-N", "-p", "gpu-fr", "-o", ANY], NODES)
    c.expect(SCANCEL)

    async def run() -> None:
        sp = slurm_fake.spawner()
        with pytest.raises(SpawnException) as e:
            await c.run(sp.start())
        assert e.value.status_code == 400
        assert "(PartitionNodeLimit)" in e.value.message

    asyncio.run(run())
    assert [x.argv for x in c.ran("scancel")] == [SCANCEL]


def test_bad_request_is_400_and_runs_no_command(slurm_fake: SlurmScript) -> None:
    async def run() -> None:
        sp = slurm_fake.spawner(user_options={"partition": "gpu-fr", "gpus": 3})
        with pytest.raises(web.HTTPError) as e:
            await slurm_fake.commands.run(sp.start())
        assert e.value.status_code == 400 and "gpus" in str(e.value.log_message)

    asyncio.run(run())
    assert slurm_fake.commands.calls == []
    assert not (slurm_fake.account.home / ".sovereign-portal").exists()


# -- poll -----------------------------------------------------------------------------------------
def test_poll_unknown_is_running_and_only_an_answer_ends_it(
    slurm_fake: SlurmScript, listening: int
) -> None:
    """A transient squeue failure (an error, or no answer) is not a dead job; a job that an
    answering squeue no longer lists is."""
    c = slurm_fake.commands

    async def run() -> list[Any]:
        sp = await started(slurm_fake, listening)
        seen: list[Any] = [await sp.poll()]
        c.expect(
            SQUEUE_42,
            stderr="slurm_load_jobs error: Unable to contact slurm controller",
            returncode=1,
        )
        assert not await c.run(sp.poller.refresh())
        seen.append(await sp.poll())
        c.expect(SQUEUE_42, hang=True)
        assert not await c.run(sp.poller.refresh())
        seen.append(await sp.poll())
        c.expect(SQUEUE_42, "")  # squeue answered: job 42 is gone
        assert await c.run(sp.poller.refresh())
        seen.append(await sp.poll())
        seen.append(sp.stop_reason)
        return seen

    assert asyncio.run(run()) == [
        None,
        None,
        None,
        1,
        "Slurm job 42: gone (the job no longer exists)",
    ]


def test_invalid_job_id_from_squeue_is_an_answer(slurm_fake: SlurmScript, listening: int) -> None:
    c = slurm_fake.commands

    async def run() -> int | None:
        sp = await started(slurm_fake, listening)
        c.expect(SQUEUE_42, stderr="slurm_load_jobs error: Invalid job id specified", returncode=1)
        assert await c.run(sp.poller.refresh())
        return await sp.poll()

    assert asyncio.run(run()) == 1


def test_walltime_end_is_told_with_its_reason(slurm_fake: SlurmScript, listening: int) -> None:
    c = slurm_fake.commands

    async def run() -> tuple[int | None, str]:
        sp = await started(slurm_fake, listening)
        c.expect(SQUEUE_42, squeue_answer({"id": 42, "state": "TIMEOUT", "nodes": "h100-a"}))
        assert await c.run(sp.poller.refresh())
        return await sp.poll(), sp.stop_reason

    assert asyncio.run(run()) == (1, "Slurm job 42: timeout (the walltime ran out)")


# -- stop -----------------------------------------------------------------------------------------
def test_stop_cancels_as_the_user_and_waits_until_slurm_says_so(
    slurm_fake: SlurmScript, listening: int
) -> None:
    c = slurm_fake.commands

    async def run() -> dict[str, Any]:
        sp = await started(slurm_fake, listening)
        c.expect(SCANCEL)
        c.expect(SQUEUE_42, squeue_answer({"id": 42, "state": "COMPLETING", "nodes": "h100-a"}))
        c.expect(SQUEUE_42, squeue_answer({"id": 42, "state": "CANCELLED"}), repeat=True)
        await c.run(sp.stop())
        info = sp.poller.info("42")
        assert info is not None and info.state == "CANCELLED"
        sp.clear_state()
        return sp.get_state()

    state = asyncio.run(run())
    assert "job_id" not in state
    assert [x.argv for x in c.ran("scancel")] == [SCANCEL]


def test_stop_of_a_job_slurm_already_ended_cancels_nothing(
    slurm_fake: SlurmScript, listening: int
) -> None:
    c = slurm_fake.commands

    async def run() -> None:
        sp = await started(slurm_fake, listening)
        c.expect(SQUEUE_42, "")
        assert await c.run(sp.poller.refresh())
        await c.run(sp.stop())

    asyncio.run(run())
    assert c.ran("scancel") == []


# -- a hub restart -------------------------------------------------------------------------------
def test_readoption_after_a_restart_polls_once_and_never_guesses(
    slurm_fake: SlurmScript, listening: int
) -> None:
    """The new hub's spawner (load_state) asks Slurm; while Slurm is silent the server stays
    running; it is stopped only when Slurm says the job is gone. Nothing is submitted."""
    c = slurm_fake.commands

    async def first_hub() -> dict[str, Any]:
        sp = await started(slurm_fake, listening)
        return sp.get_state()

    state = asyncio.run(first_hub())
    assert state["job_id"] == "42"
    old_tag = submitted_tag(c)

    async def second_hub() -> list[Any]:
        sp = slurm_fake.spawner()  # a fresh process: a new poller that knows nothing yet
        sp.load_state(state)
        assert sp.poller.tracked == {"42"}
        c.expect(SQUEUE_42, hang=True)
        seen: list[Any] = [await c.run(sp.poll())]  # unknown: not stopped
        c.expect(SQUEUE_42, squeue_answer({"id": 42, "state": "RUNNING", "nodes": "h100-a"}))
        seen.append(await c.run(sp.poll()))
        seen.append(sp.get_state())
        c.expect(SQUEUE_42, "")
        assert await c.run(sp.poller.refresh())
        seen.append(await c.run(sp.poll()))
        return seen

    unknown, running, readopted, gone = asyncio.run(second_hub())
    assert (unknown, running, gone) == (None, None, 1)
    assert readopted == state and readopted["job_tag"] == old_tag
    assert len(c.ran("sbatch")) == 1 and c.ran("scancel") == []


def test_scripted_replay_refuses_an_unscripted_command(slurm_fake: SlurmScript) -> None:
    """The fake itself: a call the script does not expect fails the step at once."""
    c = slurm_fake.commands
    c.expect(SBATCH, "42\n")  # and nothing for squeue

    async def run() -> None:
        sp = slurm_fake.spawner()
        with pytest.raises(AssertionError, match="unscripted call"):
            await c.run(sp.start(), timeout=5)

    asyncio.run(run())
    assert c.unexpected and "squeue" in c.unexpected[0]
    c.unexpected.clear()  # seen and checked: the fixture's final check is for the others
    assert os.path.isdir(slurm_fake.account.home)


# -- the local GPU spawner's failure modes -------------------------------------------------------
@pytest.fixture
def local(tmp_path: Path) -> Iterator[Any]:
    """Make LocalGPUSpawners (tests/support/fakes.local_spawner); their processes are
    stopped by PID afterwards."""
    made: list[Any] = []

    def make(server: Any = RUNS, **config: Any) -> Any:
        sp = local_spawner(tmp_path, server, **config)
        made.append(sp)
        return sp

    yield make
    for sp in made:
        proc = getattr(sp, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)


async def until_dead(sp: Any, timeout: float = 10) -> int | None:  # noqa: ASYNC109
    for _ in range(int(timeout / 0.05)):
        status = await sp.poll()
        if status is not None:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"server of {sp.owner} still running after {timeout}s")


def test_local_server_that_exits_at_once_is_dead_and_frees_its_gpu(
    local: Any, tmp_path: Path
) -> None:
    async def run() -> tuple[dict[str, str], int | None, str]:
        sp = local(EXITS_AT_ONCE)
        await sp.start()
        held = leases(tmp_path)
        return held, await until_dead(sp), sp.ledger_end_reason

    held, status, why = asyncio.run(run())
    assert list(held.values()) == ["alice"] and status == 3 and why == "died"
    assert leases(tmp_path) == {}


def test_local_server_that_cannot_start_frees_its_gpu(local: Any, tmp_path: Path) -> None:
    async def run() -> None:
        sp = local(NO_SUCH_PROGRAM)
        with pytest.raises(OSError):
            await sp.start()
        assert sp.devices == []

    asyncio.run(run())
    assert leases(tmp_path) == {}


def test_full_box_is_409_and_starts_nothing(local: Any, tmp_path: Path) -> None:
    from sovereign_portal.spawners.inventory import AllocationError

    async def run() -> Any:
        sp = local(RUNS, user_options={"gpus": 1})
        size = sp.validate_request(sp.user_options).size
        for n in range(64):  # other servers hold every whole GPU of the box
            try:
                sp.allocator.allocate(f"bob-{n}", size)
            except AllocationError:
                break
        with pytest.raises(web.HTTPError) as e:
            await sp.start()
        assert e.value.status_code == 409
        return sp

    sp = asyncio.run(run())
    assert getattr(sp, "proc", None) is None and sp.devices == []
    held = leases(tmp_path)
    assert held and all(owner.startswith("bob-") for owner in held.values())  # none moved


def test_local_walltime_stops_the_server_and_frees_its_gpu(local: Any, tmp_path: Path) -> None:
    async def run() -> tuple[int | None, str, int | None]:
        sp = local(RUNS)
        await sp.start()
        assert await sp.poll() is None
        sp.ends_at = 1.0  # long past
        return await sp.poll(), sp.ledger_end_reason, sp.proc.poll()

    status, why, exit_code = asyncio.run(run())
    assert (status, why) == (0, "walltime") and exit_code is not None
    assert leases(tmp_path) == {}


def test_local_readoption_keeps_the_gpu_and_notices_a_dead_server(
    local: Any, tmp_path: Path
) -> None:
    """A new hub re-adopts the running server (its pid and devices from the database); when
    the process dies (a zombie not yet reaped counts as dead) the devices go back."""

    async def run() -> list[Any]:
        first = local(RUNS)
        await first.start()
        state = first.get_state()
        devices = leases(tmp_path)
        again = local(RUNS)  # the restarted hub's spawner: the same lease file
        again.load_state(state)
        seen: list[Any] = [devices, [d.id for d in again.devices], await again.poll()]
        first.proc.kill()  # the server dies; its parent (the old hub) has not reaped it
        seen.append(await until_dead(again))
        first.proc.wait(5)
        return seen

    devices, readopted, alive, dead = asyncio.run(run())
    assert readopted == list(devices) and alive is None and dead == 0
    assert leases(tmp_path) == {}
