"""The hub runs as root and writes each job's token file into the user's home: a user must
not be able to point it anywhere else with a symbolic link, before or *during* the write.

Real files and real ``chown`` (the tests run as root, like the Slurm tests); the user is a
uid with no account. The race is made deterministic with an audit hook: at the hub's first
``chmod``/``chown``, the "user" swaps ``~/.sovereign-portal`` for a link to a root-owned
directory that stands in for ``/etc``. The real-hub counterpart, with a real test user, is
``test_symlinked_portal_dir_fails_the_spawn_and_touches_nothing`` in
tests/hub/test_slurm_spawner.py.
"""

from __future__ import annotations

import os
import pwd
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyterhub.spawner import SpawnException
from sovereign_portal.spawners.slurm.spawner import SlurmGPUSpawner
from sovereign_portal.spawners.slurm.userfiles import UserFileError, remove_file, write_secret

pytestmark = pytest.mark.unit

UID, GID = 54321, 54321
TOKEN = "t0k3n" * 8
TAG = "0123456789ab.0123456789abcdef"

_ATTACKS: list[Callable[[str, tuple[Any, ...]], None]] = []


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if _ATTACKS and event in ("os.chmod", "os.chown"):
        attack = _ATTACKS.pop()  # once, and never re-entered by the attack's own calls
        attack(event, args)


sys.addaudithook(_hook)


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:
        raise RuntimeError("these tests chown files: run them as root, as CI does")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home" / "victim"
    h.mkdir(parents=True)
    os.chown(h, UID, GID)
    h.chmod(0o755)
    return h


@pytest.fixture
def etc(tmp_path: Path) -> Iterator[Path]:
    """A root-owned directory standing in for /etc; the test checks it never changes."""
    d = tmp_path / "etc"
    d.mkdir()
    d.chmod(0o755)
    (d / "passwd").write_text("root:x:0:0::/root:/bin/bash\n")
    before = snapshot(d)
    yield d
    assert snapshot(d) == before, "a directory outside the home changed"


def snapshot(d: Path) -> list[tuple[str, int, int, int]]:
    out = []
    for p in [d, *sorted(d.rglob("*"))]:
        st = p.lstat()
        out.append((str(p), st.st_uid, st.st_gid, st.st_mode))
    return out


def spawner(home: Path) -> SlurmGPUSpawner:
    sp = SlurmGPUSpawner(api_token=TOKEN)
    pw = pwd.struct_passwd(("victim", "x", UID, GID, "", str(home), "/bin/bash"))
    sp._pw = lambda: pw  # type: ignore[method-assign]
    return sp


def token_path(home: Path) -> str:
    return f"{home}/.sovereign-portal/tokens/{TAG}"


def test_token_file_is_new_0600_and_the_users_in_0700_dirs(home: Path) -> None:
    spawner(home)._write_token(token_path(home))
    for d in (home / ".sovereign-portal", home / ".sovereign-portal" / "tokens"):
        st = d.lstat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert (st.st_uid, st.st_gid) == (UID, GID)
    f = Path(token_path(home))
    st = f.lstat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (UID, GID)
    assert f.read_text() == TOKEN
    with pytest.raises(SpawnException, match="already exists"):  # O_EXCL: never reused
        spawner(home)._write_token(token_path(home))


@pytest.mark.parametrize("link", [".sovereign-portal", ".sovereign-portal/tokens"])
def test_symlinked_dir_fails_clearly_and_touches_nothing(home: Path, etc: Path, link: str):
    (home / ".sovereign-portal").mkdir(mode=0o700, exist_ok=True)
    os.chown(home / ".sovereign-portal", UID, GID)
    if link.endswith("tokens"):
        (home / link).symlink_to(etc)
    else:
        (home / link).rmdir()
        (home / link).symlink_to(etc)
    with pytest.raises(SpawnException) as e:
        spawner(home)._write_token(token_path(home))
    message = e.value.message
    assert f"~/{link} is a symbolic link" in message and "remove or rename" in message


def test_swap_for_a_link_between_check_and_chown_touches_nothing(home: Path, etc: Path):
    """TOCTOU: the directory is real when checked and a link to /etc when root chowns it."""
    portal = home / ".sovereign-portal"
    portal.mkdir(mode=0o755)
    os.chown(portal, UID, GID)

    def swap(event: str, args: tuple[Any, ...]) -> None:
        portal.rename(home / ".sovereign-portal.real")
        portal.symlink_to(etc)

    _ATTACKS.append(swap)
    try:
        spawner(home)._write_token(token_path(home))
    except SpawnException:
        pass  # refusing is fine too; what matters is that nothing outside the home changed
    finally:
        _ATTACKS.clear()
    assert portal.is_symlink()  # the swap did happen, during the write
    # The token, if written, is in the directory that was checked, inside the home.
    real = home / ".sovereign-portal.real" / "tokens" / TAG
    assert not real.exists() or real.read_text() == TOKEN


def test_existing_dir_of_another_account_is_refused_not_chowned(home: Path) -> None:
    portal = home / ".sovereign-portal"
    portal.mkdir(mode=0o755)  # root's, as if moved in by someone
    with pytest.raises(SpawnException, match="belongs to another account"):
        spawner(home)._write_token(token_path(home))
    st = portal.lstat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o755


def test_token_name_taken_by_a_link_is_refused(home: Path, etc: Path) -> None:
    tokens = home / ".sovereign-portal" / "tokens"
    tokens.mkdir(parents=True)
    for d in (tokens.parent, tokens):
        os.chown(d, UID, GID)
    (tokens / TAG).symlink_to(etc / "passwd")
    with pytest.raises(SpawnException, match="already exists"):
        spawner(home)._write_token(token_path(home))


def test_remove_follows_no_link(home: Path, etc: Path) -> None:
    (etc / TAG).write_text("root's")
    before = snapshot(etc)
    portal = home / ".sovereign-portal"
    portal.symlink_to(etc)
    remove_file(str(home), f"{home}/.sovereign-portal", TAG)
    assert snapshot(etc) == before
    (etc / TAG).unlink()  # the fixture's own snapshot was taken before this file existed


def test_directory_outside_the_home_is_refused(home: Path, etc: Path) -> None:
    with pytest.raises(ValueError):
        write_secret(str(home), str(etc), TAG, b"x", UID, GID)
    with pytest.raises(ValueError):
        write_secret(str(home), f"{home}/../etc", TAG, b"x", UID, GID)
    with pytest.raises(UserFileError):
        (home / "f").write_text("")
        write_secret(str(home), f"{home}/f", TAG, b"x", UID, GID)
