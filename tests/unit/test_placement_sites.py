"""The site file's [[sites]] (spawners/site.py): strict parsing, each error naming the field,
and partitions that take their site's jurisdiction (so ledger records carry the site's
country and operator)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from sovereign_portal.spawners.site import SiteError, load_site, parse_site

from tests.support.paths import REPO

pytestmark = pytest.mark.unit

TWO = REPO / "tests" / "support" / "sites" / "two-sites.toml"


def _two() -> dict[str, Any]:
    return tomllib.loads(TWO.read_text())


def test_the_two_site_file_declares_paris_and_julich() -> None:
    site = load_site(TWO)
    assert [s.name for s in site.sites] == ["paris", "julich"]
    fr, de = site.partition("gpu-fr"), site.partition("gpu-de")
    assert (fr.jurisdiction.country, fr.jurisdiction.operator) == ("FR", "Test Centre FR")
    assert (de.jurisdiction.country, de.jurisdiction.certifications) == ("DE", ["ISO27001", "C5"])
    assert site.site_name_of("gpu-de") == "julich"
    julich = site.cluster_site("julich")
    assert julich.scheduler.transport == "rest"
    assert [p.name for p in site.partitions_of("paris")] == ["gpu-fr"]
    # Without [[sites]], the ledger's site is the deployment (as before).
    one = load_site(REPO / "tests" / "support" / "sites" / "slurm-test.toml")
    assert one.sites == [] and one.site_name_of("gpu-fr") == "Sovereign test cluster"


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(SiteError) as e:
        parse_site(data, "two.toml")
    return str(e.value)


def test_an_unknown_field_of_a_site_is_refused_naming_it() -> None:
    data = _two()
    data["sites"][1]["scheduler"]["password"] = "x"
    msg = _error(data)
    assert "sites[1] (name='julich').scheduler.rest.password" in msg
    assert "Extra inputs are not permitted" in msg


def test_a_plain_http_endpoint_off_loopback_is_refused() -> None:
    data = _two()
    data["sites"][1]["scheduler"]["url"] = "http://slurm.julich.example:6820"
    assert "plain http is allowed to a loopback address only" in _error(data)


def test_an_unknown_transport_is_refused() -> None:
    data = _two()
    data["sites"][0]["scheduler"] = {"transport": "ssh"}
    assert "sites[0] (name='paris').scheduler" in _error(data)


def test_site_names_are_unique_and_partitions_name_declared_sites() -> None:
    data = _two()
    data["sites"][1]["name"] = "paris"
    data["partitions"][1]["site"] = "paris"
    assert "site names must be unique" in _error(data)
    data = _two()
    data["partitions"][1]["site"] = "berlin"
    assert "site 'berlin' is not declared in [[sites]] (declared: paris, julich)" in _error(data)
    data = _two()
    del data["partitions"][1]["site"]
    data["partitions"][1]["jurisdiction"] = {"country": "DE", "operator": "x"}
    assert "needs site = one of ['paris', 'julich']" in _error(data)


def test_a_partition_cannot_claim_another_country_than_its_site() -> None:
    data = _two()
    data["partitions"][1]["jurisdiction"] = {"country": "FR", "operator": "Test Centre DE"}
    msg = _error(data)
    assert "partition 'gpu-de': jurisdiction FR/'Test Centre DE' differs from its site" in msg


def test_a_repeated_key_in_a_site_is_refused(tmp_path: Path) -> None:
    text = TWO.read_text().replace('name = "julich"', 'name = "julich"\nname = "bonn"')
    f = tmp_path / "dup.toml"
    f.write_text(text)
    with pytest.raises(SiteError, match="not valid TOML"):
        load_site(f)


def test_site_state_counts_free_devices_from_the_queue() -> None:
    from sovereign_portal.spawners.slurm.client import JobInfo, parse_squeue
    from sovereign_portal.spawners.slurm.sites import capacity, site_state

    site = load_site(TWO)
    assert capacity(site.partition("gpu-fr")) == 8
    running = parse_squeue(
        "1|RUNNING|None|fr-h100-a|N/A|spbob|gpu|5;gres:gpu:h100:6;1|x\n"
        "2|COMPLETED|None|fr-h100-a|N/A|spbob|gpu|5;gres:gpu:h100:2;1|x\n"
        "3|RUNNING|None|de-h100-a|N/A|spbob|other|5;gres/gpu:h100=2;1|x\n"
    )
    assert running["1"].devices == 6 and running["3"].devices == 2
    st = site_state(site, "paris", running)
    assert st.reachable and st.free == {"gpu-fr": 2} and st.queue_minutes == {"gpu-fr": 0.0}
    waiting = {**running, "4": JobInfo("4", "PENDING", "Resources", "", "N/A", "u", "", "gpu")}
    st = site_state(site, "paris", waiting)
    assert st.free == {"gpu-fr": 0} and st.queue_minutes["gpu-fr"] == 120.0
    down = site_state(site, "julich", None)
    assert not down.reachable and down.why == "its scheduler does not answer"
