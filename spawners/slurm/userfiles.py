"""Files the hub (running as root) writes inside a user's home, without following links.

The hub creates ``~/.sovereign-portal/{tokens,logs}`` for the user and writes each job's
one-time API token file there. Every directory below the home is a name the *user*
controls: they may swap it for a symbolic link at any moment, including between a check
and a use. So nothing here ever goes by path below the home:

- the home itself is opened by its path from the password database (root's; users cannot
  rename entries of ``/home``);
- each component below it is opened with ``O_DIRECTORY | O_NOFOLLOW`` relative to its
  parent's descriptor (``dir_fd``): a link, or anything that is not a directory, fails;
- a missing component is created with ``mkdir(name, dir_fd=...)`` and handed to the user
  with ``fchown`` on its own descriptor; an existing one must already belong to the user
  (root never chowns a directory it did not just create);
- modes are set with ``fchmod``, and the token file is created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` relative to its directory's descriptor, mode 0600.

If the user swaps a directory after it was opened, the descriptor still names the
directory that was checked, inside the home: nothing outside the home is ever touched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import PurePosixPath

from ..errors import Conflict

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UserFileError(Conflict):
    """A user's portal directory or file could not be made safely. ``str()`` is for users.

    One message argument only (a :class:`~..errors.PortalError`): passing an errno first
    once showed the spawn page a tuple such as ``(40, "…")``.
    """

    default_reason = "unsafe_user_dir"


def below_home(home: str, path: str) -> tuple[str, ...]:
    """The components of ``path`` below ``home``; ValueError if it is not strictly below it."""
    rel = PurePosixPath(path).relative_to(PurePosixPath(home))  # ValueError if outside
    parts = rel.parts
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{path!r} is not a directory below {home!r}")
    return tuple(parts)


def _shown(home: str, parts: tuple[str, ...]) -> str:
    return "~/" + "/".join(parts) if parts else "your home directory"


@contextlib.contextmanager
def user_dir(home: str, parts: tuple[str, ...], uid: int, gid: int) -> Iterator[int]:
    """Yield a descriptor of ``home/<parts...>``, each part a real directory owned by the user.

    Missing parts are created (mode 0700, then ``fchown`` to ``uid:gid``); every part ends
    mode 0700. Raises :class:`UserFileError` naming the part and what to do about it.
    """
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(parts):
            shown = _shown(home, parts[: i + 1])
            created = False
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
                created = True
            except FileExistsError:
                pass
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UserFileError(
                        f"{shown} is a symbolic link or not a directory. The portal keeps "
                        "your server's one-time token there and never follows links: "
                        f"remove or rename {shown}, then start your server again.",
                    ) from None
                raise
            os.close(fd)
            fd = child
            st = os.fstat(fd)
            if not stat.S_ISDIR(st.st_mode):  # pragma: no cover - O_DIRECTORY said so
                raise UserFileError(f"{shown} is not a directory")
            if st.st_uid != uid:
                # Only a directory this call just made (still ours, still empty) is handed
                # over; root never gives away one that already existed.
                if not (created and st.st_uid == os.geteuid() and st.st_nlink == 2):
                    raise UserFileError(
                        f"{shown} belongs to another account (uid {st.st_uid}). Remove or "
                        "rename it, or ask the operators to, then start your server again.",
                    )
                os.fchown(fd, uid, gid)
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.fchmod(fd, 0o700)
        yield fd
    finally:
        os.close(fd)


def write_secret(home: str, directory: str, name: str, data: bytes, uid: int, gid: int) -> None:
    """Create ``directory/name`` (below ``home``) with ``data``: new, 0600, owned by the user."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a plain file name: {name!r}")
    with user_dir(home, below_home(home, directory), uid, gid) as dfd:
        try:
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dfd,
            )
        except FileExistsError:
            raise UserFileError(
                f"the token file {name} already exists; start your server again"
            ) from None
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o600)
            os.write(fd, data)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dfd)
            raise
        os.close(fd)


def remove_file(home: str, directory: str, name: str) -> None:
    """Remove ``directory/name`` below ``home`` if it is there; never follows a link."""
    try:
        parts = below_home(home, directory)
    except ValueError:
        return
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                return  # gone, or swapped for a link: nothing of ours to remove
            os.close(fd)
            fd = child
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
