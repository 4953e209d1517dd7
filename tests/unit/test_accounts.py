"""UnixAccountPolicy: the one rule that keeps portal jobs off system accounts."""

from __future__ import annotations

import pwd

import pytest
from sovereign_portal.spawners.accounts import (
    DEFAULT_DENIED,
    SystemAccountError,
    UnixAccountPolicy,
)
from traitlets.config import Config

pytestmark = pytest.mark.unit


def _first_account(pred) -> pwd.struct_passwd:
    for pw in pwd.getpwall():
        if pred(pw):
            return pw
    raise AssertionError("no such account on this host")


@pytest.mark.parametrize(
    ("name", "refused"),
    [
        ("root", "on the deny list"),
        ("ROOT", "on the deny list"),
        ("daemon", "on the deny list"),
        ("nobody", "on the deny list"),
        ("slurm", "on the deny list"),
        ("no-such-account-here", None),
    ],
)
def test_names(name: str, refused: str | None) -> None:
    assert UnixAccountPolicy().refusal(name) == refused


def test_uid_range_applies_to_accounts_not_on_the_list() -> None:
    # A system account (uid < 1000) that is not on the deny list: refused by its uid.
    pw = _first_account(
        lambda p: 0 < p.pw_uid < 1000 and p.pw_gid != 0 and p.pw_name not in DEFAULT_DENIED
    )
    why = UnixAccountPolicy().refusal(pw.pw_name)
    assert why is not None and f"uid {pw.pw_uid}" in why
    # Lowering the floor below it lets it through (the range is configurable).
    cfg = Config()
    cfg.UnixAccountPolicy.min_uid = 1
    cfg.UnixAccountPolicy.denied_names = set()
    assert UnixAccountPolicy(config=cfg).refusal(pw.pw_name) is None


def test_root_even_without_the_deny_list() -> None:
    cfg = Config()
    cfg.UnixAccountPolicy.denied_names = set()
    assert UnixAccountPolicy(config=cfg).refusal("root") == "uid 0, outside 1000-59999"


def test_min_uid_cannot_admit_root() -> None:
    cfg = Config()
    cfg.UnixAccountPolicy.min_uid = 0
    with pytest.raises(Exception, match="uid 0 is root"):
        UnixAccountPolicy(config=cfg)


def test_check_raises_with_a_user_message() -> None:
    with pytest.raises(SystemAccountError) as err:
        UnixAccountPolicy().check("root")
    assert "system account" in err.value.message and err.value.account == "root"
    with pytest.raises(KeyError):
        UnixAccountPolicy().check("no-such-account-here")
