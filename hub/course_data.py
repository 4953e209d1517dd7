"""A course's shared data folder in its servers: read-only for students, read-write for staff.

The folder is the course's ``data_path`` (:class:`.courses.Course`, under
``CoursePolicy.data_root``). Its permissions are POSIX ACLs that the hub (root) writes
itself, as the ``system.posix_acl_access`` and ``system.posix_acl_default`` extended
attributes (no ``setfacl`` needed; ext4, XFS, Lustre and NFSv3 keep them):

- the course's **staff** (instructors and teaching assistants of the course record) get
  ``rwx``: one named-user entry each, by the uid of their Unix account;
- its **students** (the members of the hub group ``course-<id>``) get ``r-x`` (``r--`` on
  files that are not executable);
- everyone else gets nothing (``other`` is ``---``): the folder's owner (the operator who
  made it) keeps its own bits.

Directories carry the same entries as their default ACL, so a file a member of staff adds
later is readable by the students and writable by the other staff. The ACL is the course's:
at every spawn of a course server the hub sets it from the course's current staff and
students (:func:`sync_course`, a no-op when the top folder already has it), and the portal
service has the hub set it again at every roster change (the hub's ``data-access`` route,
:mod:`.class_start_hub`): a student removed from the roster loses access at once.

Every server of a course member (student or staff), local (``switch_user``) or on Slurm,
gets a link ``~/course-data/<course id>`` to the folder, made by the hub with the same
no-link-following rules as the token files (:mod:`sovereign_portal.spawners.slurm.userfiles`).
At the end date :func:`seal` takes write permission out of every entry (the course's data
goes read-only for everyone, staff included) and hands every file to the folder's owner,
so nobody can give themselves write permission back.

A problem with the folder (missing, not permitted) is logged and never stops a spawn: the
server starts without the link.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("sovereign_portal.course_data")

ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"
#: Tags of the Linux POSIX ACL xattr format (include/uapi/linux/posix_acl_xattr.h).
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_VERSION = 2
_UNDEFINED = 0xFFFFFFFF
R, W, X = 4, 2, 1
#: The folder in a course member's home that holds the links.
LINK_DIR = "course-data"

Entry = tuple[int, int, int]  # (tag, perm, id)


# -- the ACL xattr ------------------------------------------------------------------------------
def encode(entries: Iterable[Entry]) -> bytes:
    """The xattr value of an ACL (entries sorted by tag, then id, as the kernel wants)."""
    out = [struct.pack("<I", _VERSION)]
    for tag, perm, ident in sorted(entries, key=lambda e: (e[0], e[2])):
        out.append(struct.pack("<HHI", tag, perm, ident))
    return b"".join(out)


def decode(raw: bytes) -> list[Entry]:
    """The entries of an ACL xattr value; ValueError for anything else."""
    if len(raw) < 4 or (len(raw) - 4) % 8 or struct.unpack_from("<I", raw)[0] != _VERSION:
        raise ValueError("not a POSIX ACL (version 2) xattr value")
    return [struct.unpack_from("<HHI", raw, 4 + 8 * i) for i in range((len(raw) - 4) // 8)]


def read_acl(path: str | os.PathLike[str], name: str = ACCESS) -> list[Entry] | None:
    """The ACL of ``path`` (not following a link), or None when it has none."""
    try:
        return decode(os.getxattr(path, name, follow_symlinks=False))
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def named_users(path: str | os.PathLike[str]) -> dict[int, int]:
    """uid -> permission bits of the named-user entries of ``path``'s access ACL."""
    return {i: p for t, p, i in read_acl(path) or [] if t == USER}


def _acl(owner: int, users: Mapping[int, int]) -> list[Entry]:
    mask = 0
    for p in users.values():
        mask |= p
    entries: list[Entry] = [(USER_OBJ, owner, _UNDEFINED), (GROUP_OBJ, 0, _UNDEFINED)]
    entries += [(USER, p, uid) for uid, p in users.items()]
    entries += [(MASK, mask, _UNDEFINED), (OTHER, 0, _UNDEFINED)]
    return entries


def _perms(st: os.stat_result, students: Iterable[int], staff: Iterable[int]) -> dict[int, int]:
    """Each member's bits on one entry: x only on folders and files that are executable."""
    x = X if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0
    out = dict.fromkeys(students, R | x)
    out.update(dict.fromkeys(staff, R | W | x))
    return out


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """``root`` and everything below it, never following a link (links are skipped)."""
    st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode):
        return
    yield str(root), st
    for top, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            p = os.path.join(top, name)
            s = os.lstat(p)
            if not stat.S_ISLNK(s.st_mode):
                yield p, s


def _set(path: str, st: os.stat_result, users: Mapping[int, int]) -> None:
    owner = (st.st_mode >> 6) & 7
    os.setxattr(path, ACCESS, encode(_acl(owner, users)), follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        os.setxattr(path, DEFAULT, encode(_acl(R | W | X, users)), follow_symlinks=False)


def apply(path: str | os.PathLike[str], students: Iterable[int], staff: Iterable[int]) -> int:
    """Give ``staff`` (uids) read-write and ``students`` read-only access to the folder and
    everything in it, and nobody else any; a uid in both is staff. Returns the entries
    written (0 when the top folder already had exactly this ACL: nothing to do)."""
    root = Path(path)
    staff_set = set(staff)
    studs = set(students) - staff_set
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"course data folder {root} is not a folder")
    want = _acl((st.st_mode >> 6) & 7, _perms(st, studs, staff_set))
    if read_acl(root) is not None and sorted(read_acl(root) or []) == sorted(want):
        default = read_acl(root, DEFAULT)
        if default is not None and sorted(default) == sorted(_acl(7, _perms(st, studs, staff_set))):
            return 0
    n = 0
    for p, s in _walk(root):
        _set(p, s, _perms(s, studs, staff_set))
        n += 1
    return n


def seal(path: str | os.PathLike[str]) -> int:
    """The end of a course: every entry under ``path`` loses write permission for everyone
    (named users, the mask, the owner; default ACLs too) and belongs to the top folder's
    owner (nobody can chmod write permission back). Returns the entries changed."""
    root = Path(path)
    if not root.exists():
        return 0
    top = os.lstat(root)
    n = 0
    for p, st in _walk(root):
        acl = read_acl(p)
        if acl is not None:
            os.setxattr(p, ACCESS, encode([(t, q & ~W, i) for t, q, i in acl]),
                        follow_symlinks=False)  # fmt: skip
        default = read_acl(p, DEFAULT) if stat.S_ISDIR(st.st_mode) else None
        if default is not None:
            os.setxattr(p, DEFAULT, encode([(t, q & ~W, i) for t, q, i in default]),
                        follow_symlinks=False)  # fmt: skip
        if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (top.st_uid, top.st_gid):
            os.chown(p, top.st_uid, top.st_gid, follow_symlinks=False)
        mode = stat.S_IMODE(os.lstat(p).st_mode)
        if mode & 0o222:
            os.chmod(p, mode & ~0o222, follow_symlinks=False)
        n += 1
    return n


# -- the link in a member's home ----------------------------------------------------------------
def link(home: str, uid: int, gid: int, course_id: str, target: str) -> bool:
    """Make ``~/course-data/<course_id>`` a link to ``target`` (the folder made, owned by
    the user, mode 0700, without following links). A link elsewhere is replaced; anything
    else the user put there is left alone (False)."""
    from sovereign_portal.spawners.slurm.userfiles import user_dir

    with user_dir(home, (LINK_DIR,), uid, gid) as fd:
        try:
            if os.readlink(course_id, dir_fd=fd) == target:
                return True
            os.unlink(course_id, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno == errno.EINVAL:  # not a link: the user's own file or folder
                return False
            raise
        os.symlink(target, course_id, dir_fd=fd)
        with contextlib.suppress(OSError):  # the link itself: the user's, like its folder
            os.chown(course_id, uid, gid, dir_fd=fd, follow_symlinks=False)
    return True


# -- the hub's spawn path ----------------------------------------------------------------------
def server_account(spawner: Any) -> str | None:
    """The Unix account a server runs as: the Slurm spawner's ``unix_user``, the user's own
    name for a local spawner with ``switch_user``; None when servers run as the hub's
    account (no per-user permission is possible)."""
    if hasattr(spawner, "unix_user_template"):
        return str(spawner.unix_user)
    if getattr(spawner, "switch_user", False):
        return str(spawner.user.name)
    return None


def _account_of(spawner: Any, name: str) -> str:
    """The Unix account of hub user ``name``, as the spawner maps its own user's."""
    mapping = getattr(spawner, "unix_user_for", None)
    return str(mapping(name)) if callable(mapping) else name


def _uids(spawner: Any, names: Iterable[str]) -> set[int]:
    """The uids of the Unix accounts of hub users ``names``: those that exist and are no
    system account (:class:`~sovereign_portal.spawners.accounts.UnixAccountPolicy`)."""
    from sovereign_portal.spawners.accounts import UnixAccountPolicy

    policy = UnixAccountPolicy(parent=spawner)
    out = set()
    for name in names:
        account = _account_of(spawner, name)
        if policy.refusal(account) is not None:
            continue
        try:
            out.add(pwd.getpwnam(account).pw_uid)
        except KeyError:
            continue  # no account yet: granted at its own first course spawn
    return out


def _members(spawner: Any, group: str) -> list[str]:
    """The hub users in hub group ``group`` (the spawning user's ORM groups have them)."""
    for g in getattr(spawner.user, "groups", []) or []:
        if g.name == group:
            return [u.name for u in g.users]
    try:
        from jupyterhub import orm

        db = spawner.user.db
        found = db.query(orm.Group).filter(orm.Group.name == group).first()
        return [u.name for u in found.users] if found is not None else []
    except Exception:  # not inside a hub: no members known but the user
        return []


def sync_course(spawner: Any, course: Any) -> int:
    """Set the ACL of ``course``'s data folder from its staff (the course record) and
    students (the members of its hub group now), as ``spawner`` maps hub users to Unix
    accounts; returns the entries written (0: it had this ACL already). The one path
    that sets the ACL: every course spawn (:meth:`CourseDataGate.prepare`) and every
    roster or staff change (the hub's ``data-access`` route, :mod:`.class_start_hub`)."""
    staff = _uids(spawner, [*course.instructors, *course.tas])
    students = _uids(spawner, _members(spawner, course.group))
    n = apply(course.data_path, students, staff)
    if n:
        spawner.log.info(
            "Course %s data %s: %d entries for %d staff, %d students",
            course.id, course.data_path, n, len(staff), len(students - staff),
        )  # fmt: skip
    return n


_STORES: dict[str, Any] = {}


def course_store(config: Any) -> Any:
    """The course store of the portal database that hub config ``config`` names (one per
    URL, for the hub's own routes)."""
    from .course_store import CourseStore
    from .store import PortalDatabase

    url = PortalDatabase(config=config).url
    if url not in _STORES:
        _STORES[url] = CourseStore(PortalDatabase(config=config).open(upgrade=False))
    return _STORES[url]


class CourseDataGate:
    """The data-folder step of a course server's spawn (:func:`install`, from
    :func:`.portal.configure`): after the earlier pre-spawn hooks (budget admission, the
    ledger) it sets the ACL of each of the user's courses' data folders and links them in
    the server's home."""

    def __init__(self, previous: Any = None) -> None:
        from .course_store import CourseSpawnGate

        self._previous = previous
        self._courses = CourseSpawnGate()  # its course store per database URL

    def __deepcopy__(self, memo: Any) -> CourseDataGate:
        return self  # traitlets deep-copies config values; every spawner shares one gate

    def courses(self, spawner: Any) -> list[tuple[Any, bool]]:
        """(course, is staff) for each active course of the user that has a data folder."""
        from .course_store import ACTIVE

        store = self._courses.store(spawner)
        user = spawner.user.name
        groups = {g.name for g in getattr(spawner.user, "groups", []) or []}
        out = []
        for course, state in store.rows():
            if state != ACTIVE or not course.data_path:
                continue
            staff = user in course.instructors or user in course.tas
            if staff or course.group in groups:
                out.append((course, staff))
        return out

    def prepare(self, spawner: Any) -> list[str]:
        """Set the folders' ACLs and the links for one spawn; returns the course ids linked.
        Problems are logged, never raised."""
        linked: list[str] = []
        try:
            courses = self.courses(spawner)
        except Exception:
            spawner.log.exception(
                "Course data of %s: the courses could not be read", spawner.user.name
            )
            return linked
        account = server_account(spawner)
        for course, _staff in courses:
            try:
                if account is not None:
                    sync_course(spawner, course)
                    pw = pwd.getpwnam(account)
                    home, uid, gid = pw.pw_dir, pw.pw_uid, pw.pw_gid
                else:  # servers run as the hub's account, each with its own home
                    home = spawner.home_dir_template.format(username=spawner.user.escaped_name)
                    os.makedirs(home, 0o700, exist_ok=True)
                    uid, gid = os.geteuid(), os.getegid()
                if link(home, uid, gid, course.id, str(course.data_path)):
                    linked.append(course.id)
                else:
                    spawner.log.warning(
                        "Course %s: ~/%s/%s of %s is not a link; left alone",
                        course.id, LINK_DIR, course.id, spawner.user.name,
                    )  # fmt: skip
            except Exception as e:  # the server starts without this course's data
                spawner.log.warning(
                    "Course %s data folder %s for %s: %s", course.id, course.data_path,
                    spawner.user.name, e,
                )  # fmt: skip
        return linked

    async def pre_spawn_hook(self, spawner: Any) -> None:
        import inspect

        if self._previous is not None:
            out = self._previous(spawner)
            if inspect.isawaitable(out):
                await out
        if getattr(spawner, "resolved", None) is None and not hasattr(spawner, "validate_request"):
            return  # not a portal spawner
        self.prepare(spawner)


def install(c: Any) -> CourseDataGate:
    """The data-folder step in hub config ``c``, after the pre-spawn hooks already set."""
    gate = CourseDataGate(c.Spawner.get("pre_spawn_hook"))
    c.Spawner.pre_spawn_hook = gate.pre_spawn_hook
    return gate
