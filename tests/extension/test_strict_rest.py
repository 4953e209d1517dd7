"""The extension's REST API reads bodies and query arguments through the one strict helper
(issue 9): a real Jupyter server with the extension, against the real portal service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.sessions import extension_call as call

pytestmark = [pytest.mark.extension, pytest.mark.timeout(180)]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b'{"request": {"kind": "dask"}, "request": {"kind": "torch"}}', 400, "appears twice"),
        (b'{"request": {"kind": "dask", "gpus": 1, "gpus": 8}}', 400, "appears twice"),
        (b'{"request": {"kind": "dask", "gpus": NaN}}', 400, "NaN"),
        (b'{"request": {"kind": "dask", "gpus": 1e999}}', 400, "too large"),
        (b'{"request": {"kind": "dask", "image": "base"}}', 400, "image"),
        (b'{"request": {"kind": "dask"}}\xff', 400, "UTF-8"),
        (b" " * (64 * 1024 + 1), 413, "over"),
    ],
)
async def test_session_bodies_are_refused_by_the_one_helper(
    jp_fetch: Any, tmp_path: Path, body: bytes, status: int, words: str
) -> None:
    code, err = await call(jp_fetch, "POST", "sessions", body=body)
    assert code == status, (code, err)
    assert words in err["error"] and err["status"] == status, err
    _, listed = await call(jp_fetch, "GET", "sessions")
    assert listed == []
    assert not (tmp_path / "sessions").exists() or not list((tmp_path / "sessions").iterdir())


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("version=٣&wait=1", "version"),
        ("version=+3&wait=1", "version"),
        ("version=3&wait=nan", "wait"),
        ("version=3&wait=inf", "wait"),
        ("version=3&wait=1e1", "wait"),
        ("version=3&wait=٢", "wait"),
        ("version=3&wait=31", "wait"),
    ],
)
async def test_query_numbers_are_canonical_ascii(jp_fetch: Any, query: str, field: str) -> None:
    ok, s = await call(jp_fetch, "POST", "sessions", body={"request": {"kind": "dask", "gpus": 1}})
    assert ok == 201, s
    try:
        params = dict(p.split("=", 1) for p in query.split("&"))
        r = await jp_fetch(
            "sovereign-portal", "api", "sessions", s["id"], params=params, raise_error=False
        )
        assert r.code == 400, r.body[:300]
        err = json.loads(r.body)
        assert err["field"] == field and field in err["error"], err
    finally:
        await call(jp_fetch, "DELETE", "sessions", s["id"])
