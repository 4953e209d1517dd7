"""``hub.portal.configure()`` wires the portal service and one shared device lease file."""

from __future__ import annotations

from pathlib import Path

import pytest
from sovereign_portal.hub.portal import configure
from traitlets.config import Config

pytestmark = pytest.mark.unit

IDP = {
    "issuer": "http://127.0.0.1:1/",
    "client_id": "hub",
    "client_secret_file": "/dev/null",
    "allowed_organisations": ["uni-b.example"],
}


def test_configure_runs_the_portal_service_on_the_spawners_leases(tmp_path: Path) -> None:
    c = Config()
    configure(c, str(tmp_path), port=8100, auth="idp", idp=IDP, service_port=10555)
    leases = str(tmp_path / "device-leases.json")
    assert c.LocalGPUSpawner.lease_file == leases
    (svc,) = c.JupyterHub.services
    assert svc["name"] == "sovereign-portal" and svc["url"] == "http://127.0.0.1:10555"
    assert f"--PortalService.lease_file={leases}" in svc["command"]
    assert "--PortalService.inventory_source=auto" in svc["command"]
    access = "access:services!service=sovereign-portal"
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert access in roles["user"]["scopes"]
    # the service reads users' roles (portal-<role>) as well as their groups
    assert "read:roles:users" in roles["sovereign-portal-service"]["scopes"]
    assert access in c.Spawner.server_token_scopes
    url = c.Spawner.environment["SOVEREIGN_PORTAL_SERVICE_URL"]
    assert url == "http://127.0.0.1:10555/services/sovereign-portal/"


def test_configure_passes_the_inventory_source_to_both(tmp_path: Path) -> None:
    c = Config()
    configure(c, str(tmp_path), auth="dev", inventory_source="declared")
    assert c.LocalGPUSpawner.inventory_source == "declared"
    assert "--PortalService.inventory_source=declared" in c.JupyterHub.services[0]["command"]


def test_residency_reaches_the_spawner_and_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sovereign_portal.hub.service import RESIDENCY_ENV, PortalService

    rules = {"project-health": ["FR"], "project-eu": ["FR", "DE"]}
    c = Config()
    configure(c, str(tmp_path), auth="dev", residency=rules)
    assert c.LocalGPUSpawner.residency == rules
    env = c.JupyterHub.services[0]["environment"]
    # The service reads the rules the hub hands it, exactly (a dict flag would not parse).
    monkeypatch.setenv(RESIDENCY_ENV, env[RESIDENCY_ENV])
    assert PortalService().residency == rules
    monkeypatch.setenv(RESIDENCY_ENV, '{"project-x": "FR"}')
    with pytest.raises(ValueError, match="JSON object of group -> \\[countries\\]"):
        PortalService().residency  # noqa: B018


def test_configure_puts_the_portal_database_in_the_state_dir(tmp_path: Path) -> None:
    from sovereign_portal.hub.store import PortalDatabase

    c = Config()
    configure(c, str(tmp_path), auth="dev")
    assert c.PortalDatabase.url == f"sqlite:///{tmp_path / 'portal.sqlite'}"
    store = PortalDatabase(config=c).open()  # the embedded default needs no setup
    try:
        assert (tmp_path / "portal.sqlite").is_file()
        assert store.current_revision() == store.head_revision()
    finally:
        store.dispose()


def test_the_hubs_own_database_is_in_wal_mode_and_stays_durable(tmp_path: Path) -> None:
    import sqlite3

    state = tmp_path / "state"  # not there yet: configure() makes it
    c = Config()
    configure(c, str(state), auth="idp", idp=IDP)
    db = state / "jupyterhub.sqlite"
    assert c.JupyterHub.db_url == f"sqlite:///{db}"
    # a fresh connection, as JupyterHub's own, finds WAL mode kept in the file
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL, the default
        conn.execute("CREATE TABLE t (a INTEGER)")  # JupyterHub creates its tables in it
        conn.commit()
    finally:
        conn.close()
    configure(Config(), str(state), auth="idp", idp=IDP)  # a restart keeps what is there
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


@pytest.mark.parametrize("orgs", [None, [], "uni-a.example"])
def test_production_configure_needs_an_explicit_allow_list(tmp_path: Path, orgs: object) -> None:
    idp = {k: v for k, v in IDP.items() if k != "allowed_organisations"}
    if orgs is not None:
        idp["allowed_organisations"] = orgs
    with pytest.raises(ValueError, match=r"idp\['allowed_organisations'\] must list"):
        configure(Config(), str(tmp_path), auth="idp", idp=idp)


def test_production_configure_holds_no_demo_values(tmp_path: Path) -> None:
    c = Config()
    configure(c, str(tmp_path), auth="idp", idp=IDP)
    a = c.InstitutionalAuthenticator
    assert a.allowed_organisations == {"uni-b.example"}
    assert "support_contact" not in a  # the authenticator's own default, not a demo desk
    c = Config()
    configure(c, str(tmp_path), auth="idp", idp={**IDP, "support_contact": "hpc@uni-b.example"})
    assert c.InstitutionalAuthenticator.support_contact == "hpc@uni-b.example"


def test_the_service_gets_the_hubs_slurm_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    """JupyterHub hands a managed service only the variables of its entry, and the service
    runs Slurm clients (the batched poll, class reservations) against the hub's cluster."""
    from sovereign_portal.hub.service import service_config

    monkeypatch.delenv("SLURM_CONF", raising=False)
    assert "SLURM_CONF" not in service_config()["environment"]
    monkeypatch.setenv("SLURM_CONF", "/srv/slurm/site-a/slurm.conf")
    assert service_config()["environment"]["SLURM_CONF"] == "/srv/slurm/site-a/slurm.conf"
    # an explicit value for the service wins over the hub's
    env = service_config(extra_env={"SLURM_CONF": "/etc/slurm/other.conf"})["environment"]
    assert env["SLURM_CONF"] == "/etc/slurm/other.conf"
