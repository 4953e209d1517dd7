"""The spawn options form, built from the catalog, and its parser. Pure functions."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from html import escape
from typing import Any

from .request import FIELD_KINDS, MAX_WALLTIME_MINUTES, RequestError, request_from_size_id
from .site import Partition
from .sizes import Size, partition_sizes, size_eur_per_hour
from .strict import parse_int, shorten

FORM_FIELDS = ("course", "size", "walltime_minutes", "image")


def render_form(
    partitions: Sequence[Partition],
    free: Callable[[Partition, Size], int | None] | None = None,
    images: Sequence[str] = (),
    notebook_only: bool = True,
    notes: Mapping[str, str] | None = None,
    banner: str = "",
    sizes: Collection[str] | None = None,
    courses: Sequence[tuple[str, str]] = (),
) -> str:
    """HTML for JupyterHub's spawn page: one choice per size this user may run.

    ``free`` returns how many of a size are free right now (``None`` when unknown); a size
    with none free is shown but disabled, so the user sees what exists. ``notes`` maps a
    form value (``<partition>/<size id>``) to text shown after its price, and ``banner`` is
    a line above the choices: the hub passes the remaining budget there as plain data.
    ``sizes`` keeps only those size ids (a course's sizes); ``courses`` (id, title) puts a
    course choice first, for a student of several courses.
    """
    rows: list[str] = []
    first = True
    for p in partitions:
        j = p.jurisdiction
        head = f"{p.name} — {j.country}, {j.operator}"
        rows.append(f'<optgroup label="{escape(head)}">')
        for s in partition_sizes(p):
            if notebook_only and s.nodes > 1 and "notebook" not in FIELD_KINDS["nodes"]:
                continue  # a notebook server runs on one node (the request's rule)
            if sizes is not None and s.id not in sizes:
                continue
            n = free(p, s) if free else None
            price = size_eur_per_hour(p, s)
            text = f"{s.label} · €{price:.2f}/h"
            if n is not None:
                text += f" · {n} free"
            note = (notes or {}).get(f"{p.name}/{s.id}")
            if note:
                text += f" · {note}"
            disabled = " disabled" if n == 0 else ""
            selected = " selected" if first and not disabled else ""
            first = first and bool(disabled)
            value = escape(f"{p.name}/{s.id}")
            rows.append(f'<option value="{value}"{disabled}{selected}>{escape(text)}</option>')
        rows.append("</optgroup>")
    wall_max = max((p.max_walltime_minutes for p in partitions), default=60)
    wall_default = min((p.default_walltime_minutes for p in partitions), default=60)
    choose = [
        f'<option value="{escape(cid)}">{escape(title)} ({escape(cid)})</option>'
        for cid, title in courses
    ]
    parts = [
        *([f'<p class="sp-budget">{escape(banner)}</p>'] if banner else []),
        *(
            [
                '<div class="form-group"><label for="sp-course">Course</label>',
                '<select class="form-control" id="sp-course" name="course" required>',
                '<option value="" disabled selected>Choose your course first</option>',
                *choose,
                "</select></div>",
            ]
            if courses
            else []
        ),
        '<div class="form-group">',
        '<label for="sp-size">Size</label>',
        '<select class="form-control" id="sp-size" name="size" required>',
        *rows,
        "</select>",
        "</div>",
        '<div class="form-group">',
        '<label for="sp-walltime">Walltime (minutes)</label>',
        f'<input class="form-control" id="sp-walltime" name="walltime_minutes" type="number" '
        f'min="1" max="{wall_max}" value="{wall_default}" required>',
        "</div>",
    ]
    if images:
        opts = "".join(f'<option value="{escape(i)}">{escape(i)}</option>' for i in images)
        parts += [
            '<div class="form-group"><label for="sp-image">Image</label>',
            f'<select class="form-control" id="sp-image" name="image">{opts}</select></div>',
        ]
    return "\n".join(parts)


def parse_form(formdata: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Turn the posted form into request fields; the Request model validates them next."""
    unknown = sorted(set(formdata) - set(FORM_FIELDS) - {"_xsrf"})
    if unknown:
        shown = ", ".join(repr(shorten(k)) for k in unknown[:5])  # untrusted: cut short
        raise RequestError(
            f"unknown form field(s): {shown}; allowed: {', '.join(FORM_FIELDS)}",
            field=shorten(unknown[0]),
        )

    def one(key: str) -> str | None:
        values = formdata.get(key) or []
        if len(values) > 1:
            raise RequestError(f"{key} was given {len(values)} times", field=key)
        return values[0] if values else None

    size = one("size")
    if not size or "/" not in size:
        raise RequestError("choose a size", field="size")
    partition, _, size_id = size.partition("/")
    out = request_from_size_id(size_id, partition=partition)
    wall = one("walltime_minutes")
    if wall:
        out["walltime_minutes"] = parse_int(wall, "walltime_minutes", lo=1, hi=MAX_WALLTIME_MINUTES)
    image = one("image")
    if image:
        out["image"] = image
    course = one("course")
    if course:
        out["course"] = course  # the hub's course gate takes it out before the Request
    return out
