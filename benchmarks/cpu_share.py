"""Where a benchmark's CPU went: per-part CPU seconds between two snapshots of ``/proc``.

    with CpuShare(parts) as share:
        ...  # the measured window
    print(share.report())

A part is a name and a test on a process (its uid, command name and argv). Each process is
counted in the first part that claims it, the rest under "other". A process that ended
inside the window is not seen by the second snapshot, so its CPU is missing; the report's
total says so by being the sum of what was seen.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proc:
    pid: int
    uid: int
    comm: str
    argv: tuple[str, ...]
    ticks: int  # utime + stime, in clock ticks

    def has(self, needle: str) -> bool:
        return any(needle in a for a in self.argv)


Part = tuple[str, Callable[[Proc], bool]]


def processes() -> Iterator[Proc]:
    for p in Path("/proc").iterdir():
        if not p.name.isdecimal():
            continue
        try:
            stat = (p / "stat").read_text()
            argv = (p / "cmdline").read_bytes().split(b"\0")
            uid = (p / "status").stat().st_uid
        except OSError:
            continue
        comm = stat.split("(", 1)[1].rsplit(")", 1)[0]
        rest = stat.rsplit(")", 1)[1].split()
        yield Proc(
            int(p.name),
            uid,
            comm,
            tuple(a.decode(errors="replace") for a in argv if a),
            int(rest[11]) + int(rest[12]),
        )


class CpuShare:
    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts
        self.seconds: dict[str, float] = {}

    def _snap(self) -> dict[tuple[int, str], tuple[str, int]]:
        out = {}
        for proc in processes():
            part = next((name for name, test in self.parts if test(proc)), "other")
            out[(proc.pid, proc.comm)] = (part, proc.ticks)
        return out

    def __enter__(self) -> CpuShare:
        self._before = self._snap()
        self._t0 = os.times().elapsed
        return self

    def __exit__(self, *exc: object) -> None:
        after = self._snap()
        self.wall = os.times().elapsed - self._t0
        seconds: dict[str, float] = {}
        for key, (part, ticks) in after.items():
            was = self._before.get(key, (part, 0))[1]
            seconds[part] = seconds.get(part, 0.0) + (ticks - was) / HZ
        self.seconds = seconds

    def report(self, per: int | None = None, label: str = "student") -> str:
        """One line per part, the largest first, with its share (and per ``label``)."""
        total = sum(self.seconds.values()) or 1.0
        lines = [
            f"CPU in the window ({self.wall:.1f} s of wall, {os.cpu_count()} cores): "
            f"{total:.1f} s seen"
        ]
        for name, s in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            if s < 0.05:
                continue
            each = f", {1000 * s / per:.0f} ms per {label}" if per else ""
            lines.append(f"  {s:7.2f} s  {100 * s / total:4.1f} %  {name}{each}")
        return "\n".join(lines)
