"""The one strict input path, tested by class (issue 9, section 2).

- the error family (spawners/errors.py): user message, log message, reason, status, field;
  ``str()`` is the user message, never a tuple; the spawn page gets the user message;
- JSON bodies (spawners/strict.py ``loads_json``): duplicate keys at any depth, NaN and
  Infinity, overflow, nesting, non-UTF-8, lone surrogates, size over the limit (413);
  parsed ``user_options`` get the same checks except duplicate keys;
- numbers written as text (``parse_int``): every non-ASCII character that passes
  ``str.isdigit()`` is refused, in the form's walltime and in size ids too;
- the Request field matrix: field x kind -> accepted and enforced, or refused naming it;
- the site file in strict mode, free text without control characters, unreadable files,
  and the CLI that prints it (run as the installed console script).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sovereign_portal.hub.admission import AdmissionError, Caller, admit
from sovereign_portal.spawners.errors import (
    ConfigError,
    Conflict,
    Forbidden,
    PortalError,
    RequestRefused,
    TooLarge,
)
from sovereign_portal.spawners.form import parse_form
from sovereign_portal.spawners.request import (
    FIELD_KINDS,
    Request,
    RequestError,
    parse_request,
    request_from_size_id,
    resolve,
)
from sovereign_portal.spawners.site import SiteError, load_site, parse_site
from sovereign_portal.spawners.slurm.userfiles import UserFileError, user_dir
from sovereign_portal.spawners.strict import (
    MAX_JSON_BYTES,
    check_json_value,
    loads_json,
    parse_decimal,
    parse_int,
    printable,
)

from tests.support.paths import VENV_BIN
from tests.support.slurm_cluster import SITE_FILE

pytestmark = pytest.mark.unit

SITE = load_site(SITE_FILE)
#: Every character that str.isdigit() accepts but that is not an ASCII digit.
NON_ASCII_DIGITS = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isdigit()]
NON_ASCII_DIGITS = [c for c in NON_ASCII_DIGITS if not ("0" <= c <= "9")]


# -- the error family --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "status", "reason"),
    [
        (RequestRefused, 400, "invalid_request"),
        (Forbidden, 403, "forbidden"),
        (Conflict, 409, "conflict"),
        (TooLarge, 413, "too_large"),
        (ConfigError, 500, "bad_config"),
    ],
)
def test_each_error_class_carries_its_status_reason_and_two_messages(
    cls: type[PortalError], status: int, reason: str
) -> None:
    e = cls("say what to do", log_message="detail for the log", field="gpus")
    assert (e.status, e.reason, e.field) == (status, reason, "gpus")
    assert str(e) == "say what to do" and e.log_message == "detail for the log"
    assert e.to_json() == {
        "error": "say what to do",
        "reason": reason,
        "status": status,
        "field": "gpus",
    }
    spawn = e.spawn_exception()
    # JupyterHub's form page shows jupyterhub_message; its API shows .message; never a 200
    assert spawn.status_code == status and spawn.jupyterhub_message == "say what to do"  # type: ignore[attr-defined]
    assert spawn.log_message == "detail for the log" and spawn.reason == reason  # type: ignore[attr-defined]


def test_an_error_never_has_status_200_nor_a_tuple_message() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        PortalError(40)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="4xx or 5xx"):
        PortalError("fine", status=200)
    with pytest.raises(TypeError):
        UserFileError(40, "message")  # type: ignore[arg-type]  # the old (errno, message) call


def test_request_admission_and_image_errors_are_in_the_family() -> None:
    assert issubclass(RequestError, PortalError) and issubclass(RequestError, ValueError)
    assert AdmissionError("no").status == 403 and AdmissionError("busy", "busy").status == 409
    assert SiteError("f.toml: broken").status == 500


def test_a_symlinked_portal_dir_says_what_to_do_not_a_tuple(tmp_path: Path) -> None:
    """The spawn page once showed ``(40, "...")``: the real userfiles code, a real link."""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (home / ".sovereign-portal").symlink_to(tmp_path / "elsewhere")
    with (
        pytest.raises(UserFileError) as info,
        user_dir(str(home), (".sovereign-portal", "tokens"), os.getuid(), os.getgid()),
    ):
        pass
    text = str(info.value)
    assert text.startswith("~/.sovereign-portal is a symbolic link"), text
    assert not text.startswith("(") and "40" not in text
    assert info.value.status == 409 and info.value.reason == "unsafe_user_dir"


def _deep(n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(n):
        out = {"a": out}
    return out


DEEP = {"partition": _deep(20)}


# -- JSON bodies ---------------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers(-(10**9), 10**9) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(value=json_values, path=st.lists(st.sampled_from(["a", "b", 0]), max_size=5))
def test_a_repeated_key_is_refused_at_any_depth(value: Any, path: list[Any]) -> None:
    inner = '{"k": 1, "k": 2}'
    text = inner
    for step in reversed(path):
        text = f"[{text}]" if step == 0 else f'{{"{step}": {text}}}'
    with pytest.raises(RequestRefused, match="appears twice"):
        loads_json(text)
    # the same document without the repeat parses, and so does any plain value
    assert loads_json(json.dumps(value)) == value


@pytest.mark.parametrize(
    "body",
    [
        b'{"gpus": NaN}',
        b'{"gpus": Infinity}',
        b'{"gpus": -Infinity}',
        b'{"gpus": 1e400}',
        b"[-1e999]",
    ],
)
def test_nan_infinity_and_overflow_are_not_numbers(body: bytes) -> None:
    with pytest.raises(RequestRefused) as e:
        loads_json(body)
    assert e.value.status == 400


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 17 + b"]" * 17, "nested deeper than 16"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),  # over the limit too: 413 first
        (b'{"a": "\xff"}', "not UTF-8"),
        (b'{"a": "\\ud800"}', "lone surrogate"),
        (b'{"a": 1', "not valid JSON"),
        (b"1" * 5000, "not valid JSON"),  # an integer of more digits than Python reads
    ],
)
def test_malformed_bodies_are_refused_with_a_short_message(body: bytes, message: str) -> None:
    with pytest.raises(PortalError) as e:
        loads_json(body, limit=10**6)
    assert message in str(e.value) and len(str(e.value)) < 200


def test_a_body_over_the_limit_is_413_before_parsing() -> None:
    with pytest.raises(TooLarge) as e:
        loads_json(b" " * (MAX_JSON_BYTES + 1))
    assert e.value.status == 413 and e.value.reason == "too_large"
    assert loads_json(b"", empty={}) == {}


@pytest.mark.parametrize(
    "options",
    [{"gpus": float("nan")}, {"walltime_minutes": float("inf")}, {"image": "\ud800"}, DEEP],
)
def test_parsed_user_options_get_the_same_checks(options: dict[str, Any]) -> None:
    """JupyterHub's REST API parses user_options (it accepts NaN): the spawner checks again."""
    with pytest.raises(RequestError):
        parse_request(options)
    with pytest.raises(RequestRefused):
        check_json_value(options)


# -- numbers written as text ---------------------------------------------------------------
def test_there_are_many_non_ascii_digits() -> None:
    assert {"٣", "³", "①", "߂", "𝟗"} <= set(NON_ASCII_DIGITS) and len(NON_ASCII_DIGITS) > 500


@settings(max_examples=300, deadline=None)
@given(
    digit=st.sampled_from(NON_ASCII_DIGITS),
    prefix=st.text("0123456789", max_size=3),
    suffix=st.text("0123456789", max_size=3),
)
def test_no_non_ascii_digit_passes_anywhere_a_number_is_read(
    digit: str, prefix: str, suffix: str
) -> None:
    text = prefix + digit + suffix
    with pytest.raises(RequestRefused) as e:
        parse_int(text, "count", lo=0, hi=10**9)
    assert e.value.field == "count" and "count" in str(e.value)
    with pytest.raises(RequestRefused):
        parse_decimal(text, "wait", lo=0, hi=10**9)
    with pytest.raises(RequestError) as form:
        parse_form({"size": ["gpu-fr/h100x1"], "walltime_minutes": [text]})
    assert form.value.field == "walltime_minutes"
    for size_id in (f"h100x{text}", f"h100x8x{text}n"):
        with pytest.raises(RequestError) as size:
            request_from_size_id(size_id)
        assert size.value.field == "size"


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 10**12))
def test_canonical_numbers_round_trip(n: int) -> None:
    assert parse_int(str(n), "n", lo=0, hi=10**12) == n


@pytest.mark.parametrize(
    "text", ["+1", "-1", " 1", "1 ", "1\n", "01", "00", "1_0", "0x1", "1.0", "", "１"]
)
def test_non_canonical_forms_are_refused(text: str) -> None:
    with pytest.raises(RequestRefused, match="walltime_minutes"):
        parse_int(text, "walltime_minutes", lo=0, hi=1000)


def test_bounds_name_the_field() -> None:
    with pytest.raises(
        RequestRefused, match="walltime_minutes must be a whole number from 1 to 60, got 61"
    ):
        parse_int("61", "walltime_minutes", lo=1, hi=60)
    with pytest.raises(RequestRefused, match="from 0 to 30"):
        parse_decimal("31", "wait", lo=0, hi=30)
    for bad in ("nan", "inf", "1e3", " 2", ".5", "5."):
        with pytest.raises(RequestRefused):
            parse_decimal(bad, "wait", lo=0, hi=30)
    assert parse_decimal("2.500", "wait", lo=0, hi=30) == 2.5


def test_the_form_reads_walltime_and_size_strictly() -> None:
    assert (
        parse_form({"size": ["gpu-fr/h100x2"], "walltime_minutes": ["90"]})["walltime_minutes"]
        == 90
    )
    for wall in (" 90", "090", "+90", "9\u0660"):
        with pytest.raises(RequestError, match="walltime_minutes"):
            parse_form({"size": ["gpu-fr/h100x2"], "walltime_minutes": [wall]})
    with pytest.raises(RequestError, match="unknown size") as e:
        parse_form({"size": ["gpu-fr/h100x02"]})
    assert e.value.field == "size"


# -- the Request matrix: every field x every kind -------------------------------------------
#: A non-default value of each field, valid on the test site for the kinds it is for.
SAMPLE = {
    "partition": "gpu-fr",
    "accelerator": "h100",
    "slice": "3g.40gb",
    "gpus": 2,
    "nodes": 2,
    "count": 2,
    "walltime_minutes": 30,
    "image": "base",
}
#: Fields the sample needs beside the one under test, per field.
NEEDS = {"nodes": {"gpus": 8}}
RESEARCHER = Caller(name="ada", groups=frozenset({"researcher"}), role="researcher")


def _attempt(kind: str, field: str) -> Any:
    req = {"kind": kind, **NEEDS.get(field, {}), field: SAMPLE[field]}
    if kind == "notebook":
        return resolve(SITE, parse_request(req))
    return admit(SITE, req, RESEARCHER)


@pytest.mark.parametrize("kind", ["notebook", "dask", "torch"])
@pytest.mark.parametrize("field", sorted(SAMPLE))
def test_every_field_of_every_kind_is_enforced_or_refused_by_name(kind: str, field: str) -> None:
    assert set(SAMPLE) | {"kind"} == set(Request.model_fields) == set(FIELD_KINDS)
    if kind not in FIELD_KINDS[field]:
        with pytest.raises(RequestError) as e:
            _attempt(kind, field)
        assert e.value.field == field and e.value.reason == "field_kind", e.value
        assert field in str(e.value)
        return
    out = _attempt(kind, field)
    # accepted: and what was asked is what is granted (enforced, not ignored)
    if kind == "notebook":
        got = {
            "partition": out.partition.name,
            "accelerator": out.size.accelerator,
            "slice": out.size.slice,
            "gpus": out.size.gpus_per_node,
            "walltime_minutes": out.walltime_minutes,
            "image": out.request.image,  # the spawner checks it against its allow-list
        }[field]
        assert got == SAMPLE[field]
    else:
        got = {
            "partition": out.partition,
            "accelerator": out.size["accelerator"],
            "slice": out.size["slice"],
            "gpus": out.size["gpus_per_node"],
            "nodes": out.nodes_per_job * out.jobs,
            "count": out.count,
            "walltime_minutes": out.walltime_minutes,
        }[field]
        assert got == SAMPLE[field]
        if field == "nodes":
            assert f"--nodes={SAMPLE['nodes']}" in out.scheduler_args


def test_a_notebook_for_several_nodes_is_refused_not_billed() -> None:
    with pytest.raises(RequestError, match="a notebook server runs on one node") as e:
        parse_request({"kind": "notebook", "gpus": 8, "nodes": 2})
    assert e.value.field == "nodes"
    # default values written out are fine
    assert parse_request({"kind": "dask", "nodes": 1, "image": None}).nodes == 1


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"gpus": "2"}, "gpus"),
        ({"gpus": True}, "gpus"),
        ({"walltime_minutes": 1.5}, "walltime_minutes"),
        ({"nodes": [1]}, "nodes"),
        ({"colour": "red"}, "colour"),
        ({"kind": "k8s"}, "kind"),
    ],
)
def test_pydantic_messages_name_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError) as e:
        parse_request(raw)
    assert e.value.field == field and field in str(e.value)
    assert "invalid literal" not in str(e.value)


# -- the site file --------------------------------------------------------------------------
def _site(**partition: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "name": "p",
        "backend": "slurm",
        "jurisdiction": {"country": "FR", "operator": "GENCI"},
        "nodes": [{"name": "n", "accelerator": "h100", "gpus": 8}],
        "price_eur_per_gpu_hour": {"h100": 2},
        "carbon_g_per_kwh": 50,
    }
    p.update(partition)
    return {"name": "site", "partitions": [p]}


def _node(**kw: Any) -> list[dict[str, Any]]:
    return [{"name": "n", "accelerator": "h100", "gpus": 8, **kw}]


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (_site(nodes=_node(gpus="8")), "partitions[0] (name='p').nodes[0] (name='n').gpus"),
        (_site(nodes=_node(gpus=True)), "partitions[0] (name='p').nodes[0] (name='n').gpus"),
        (_site(nodes=_node(count=2.0)), "nodes[0] (name='n').count"),
        (_site(nodes=_node(mig=[{"gpus": ["0"], "profiles": ["7g.80gb"]}])), "mig[0].gpus[0]"),
        (_site(nodes=_node(mig=[{"gpus": [True], "profiles": ["7g.80gb"]}])), "mig[0].gpus[0]"),
        (_site(carbon_g_per_kwh="50"), "partitions[0] (name='p').carbon_g_per_kwh"),
        (_site(max_walltime_minutes=False), "max_walltime_minutes"),
        (_site(price_eur_per_gpu_hour={"h100": "2"}), "price_eur_per_gpu_hour.h100"),
        (_site(allowed_groups="staff"), "allowed_groups"),
    ],
)
def test_strict_mode_no_string_or_bool_where_a_number_belongs(
    data: dict[str, Any], where: str
) -> None:
    with pytest.raises(SiteError) as e:
        parse_site(data, "site.toml")
    assert where in str(e.value), str(e.value)
    # integers are fine where a decimal belongs (TOML writes 2 for 2.0)
    assert parse_site(_site(pue=1, carbon_g_per_kwh=50), "site.toml").partitions[0].pue == 1.0


@settings(max_examples=100, deadline=None)
@given(
    ch=st.characters(categories=["Cc", "Cf", "Zl", "Zp"]),
    where=st.sampled_from(["operator", "certification", "description", "site", "group"]),
)
def test_free_text_holds_no_control_or_format_character(ch: str, where: str) -> None:
    text = f"GENCI{ch}x"
    data = _site()
    p = data["partitions"][0]
    if where == "operator":
        p["jurisdiction"]["operator"] = text
    elif where == "certification":
        p["jurisdiction"]["certifications"] = ["ISO27001", text]
    elif where == "description":
        p["description"] = text
    elif where == "site":
        data["name"] = text
    else:
        p["allowed_groups"] = [text]
    with pytest.raises(SiteError) as e:
        parse_site(data, "site.toml")
    message = str(e.value)
    assert "control or format character" in message
    # the refusal itself is printable: the character is shown escaped, never raw
    assert ascii(ch) in message
    assert all(ch not in line for line in message.split("\n"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("description", "x" * 257),
        ("operator", "x" * 129),
        ("certifications", ["x" * 65]),
        ("certifications", ["c"] * 33),
    ],
)
def test_free_text_is_bounded(field: str, value: Any) -> None:
    data = _site(description=value) if field == "description" else _site()
    if field != "description":
        data["partitions"][0]["jurisdiction"][field] = value
    with pytest.raises(SiteError, match=field):
        parse_site(data, "site.toml")


def _unreadable(tmp_path: Path, what: str) -> Path:
    if what == "directory":
        (tmp_path / "site.toml").mkdir()
    elif what == "not-utf8":
        (tmp_path / "site.toml").write_bytes(b'name = "caf\xe9"\n')
    elif what == "control-in-name":
        return tmp_path / "si\x1b[31mte.toml"
    return tmp_path / "site.toml"


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("directory", "is a directory"),
        ("not-utf8", "not UTF-8"),
        ("missing", "not found"),
        ("control-in-name", "not found"),
    ],
)
def test_unreadable_site_files_get_one_line_naming_the_file(
    tmp_path: Path, what: str, message: str
) -> None:
    path = _unreadable(tmp_path, what)
    with pytest.raises(SiteError) as e:
        load_site(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    # the installed CLI: exit 2, one line naming the file, no traceback, no raw escape
    r = subprocess.run(
        [str(VENV_BIN / "sovereign-portal"), "catalog", "--site", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert printable(str(path.name)) in lines[0] and "\x1b" not in r.stderr


def test_the_cli_never_prints_raw_control_characters(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "s"\n[[partitions]]\nname = "p"\nbackend = "slurm"\ncarbon_g_per_kwh = 5\n'
        'description = "\\u001b[2J\\u202eevil"\nprice_eur_per_gpu_hour = {h100 = 2}\n'
        'jurisdiction = {country = "FR", operator = "O"}\n'
        '[[partitions.nodes]]\nname = "n"\naccelerator = "h100"\n'
    )
    r = subprocess.run(
        [str(VENV_BIN / "sovereign-portal"), "catalog", "--site", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "partitions[0] (name='p').description" in r.stderr, r.stderr
    assert "\x1b" not in r.stderr and "\u202e" not in r.stderr
    ok = subprocess.run(
        [str(VENV_BIN / "sovereign-portal"), "catalog", "--site", str(SITE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "gpu-fr" in ok.stdout
    assert not any(printable(line) != line for line in ok.stdout.splitlines())


def test_the_notebook_client_raises_the_family_with_status_and_field() -> None:
    """The kernel-side client turns the extension's JSON error into a PortalError (a real
    HTTP server on 127.0.0.1 answers as the extension does)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from sovereign_portal.extension.client import PortalClient
    from sovereign_portal.extension.client import PortalError as ClientError

    body = RequestRefused("image: remove it", reason="field_kind", field="image").to_json()

    class Answer(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            data = json.dumps(body).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = PortalClient(f"http://127.0.0.1:{server.server_port}/api/", "t")
        with pytest.raises(ClientError) as e:
            client._call("POST", "sessions", {"request": {"kind": "dask", "image": "x"}})
    finally:
        server.shutdown()
    err = e.value
    assert isinstance(err, PortalError) and isinstance(err, RuntimeError)
    assert (str(err), err.reason, err.status, err.field) == (
        "image: remove it",
        "field_kind",
        400,
        "image",
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("data", "kw", "match"),
    [
        ({"x": True}, {}, "d.x: must be a finite number"),
        ({"x": float("nan")}, {}, "d.x: must be a finite number"),
        ({"x": "3"}, {}, "d.x: must be a finite number"),
        ({}, {}, "d.x: must be a finite number"),  # required
        ({"x": None}, {}, "d.x: must be a finite number"),
        ({"x": 11}, {}, r"d.x: must be between 0 and 10, got 11"),
    ],
)
def test_json_number_refuses_by_name(data: dict, kw: dict, match: str) -> None:
    from sovereign_portal.spawners.strict import RequestRefused, json_number

    with pytest.raises(RequestRefused, match=match):
        json_number(data, "x", "d.", lo=0, hi=10, **kw)


@pytest.mark.unit
def test_json_number_defaults_nulls_and_the_callers_error() -> None:
    from sovereign_portal.spawners.strict import json_number, only_fields

    assert json_number({}, "x", lo=0, hi=1, default=0.5) == 0.5
    assert json_number({"x": None}, "x", lo=0, hi=1, null=True) is None
    assert json_number({"x": 1}, "x", lo=0, hi=1) == 1.0 and isinstance(
        json_number({"x": 1}, "x", lo=0, hi=1), float
    )

    class Mine(ValueError):
        pass

    with pytest.raises(Mine, match=r"^x: must be between"):
        json_number({"x": 2}, "x", lo=0, hi=1, error=Mine)
    only_fields({"a": 1}, {"a", "b"})
    with pytest.raises(Mine, match=r"^w\.c: unknown field$"):
        only_fields({"a": 1, "d": 2, "c": 3}, {"a"}, "w.", error=Mine)
