"""Sizes, site files and requests: rendering, validation and the messages users see."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sovereign_portal.spawners.catalog import ACCELERATORS, GPUS_PER_HGX_NODE
from sovereign_portal.spawners.form import parse_form, render_form
from sovereign_portal.spawners.inventory import AllocationError, Allocator, declared_devices
from sovereign_portal.spawners.request import (
    RequestError,
    parse_request,
    request_from_size_id,
    resolve,
)
from sovereign_portal.spawners.site import SiteError, load_site, parse_site
from sovereign_portal.spawners.sizes import Size, partition_sizes

pytestmark = pytest.mark.unit


def slurm_site() -> dict[str, Any]:
    return {
        "name": "test",
        "partitions": [
            {
                "name": "gpu-fr",
                "backend": "slurm",
                "jurisdiction": {"country": "FR", "operator": "GENCI"},
                "price_eur_per_gpu_hour": {"h100": 2.0, "b200": 4.0},
                "carbon_g_per_kwh": 56,
                "max_walltime_minutes": 600,
                "nodes": [
                    {"name": "hgx-h100", "accelerator": "h100", "count": 4},
                    {
                        "name": "mig",
                        "accelerator": "h100",
                        "gpus": 2,
                        "mig": [{"gpus": [0, 1], "profiles": ["3g.40gb", "3g.40gb"]}],
                    },
                ],
            }
        ],
    }


SITE = parse_site(slurm_site())


def test_example_site_loads() -> None:
    site = load_site()
    assert site.partitions[0].backend == "local"
    ids = [s.id for s in partition_sizes(site.partitions[0])]
    assert ids == ["h100:1g.10gb", "h100:3g.40gb", "h100x1", "h100x2", "h100x4"]


def test_ladder_on_a_cluster() -> None:
    ids = [s.id for s in partition_sizes(SITE.partitions[0])]
    assert ids == ["h100x1", "h100x2", "h100x4", "h100x8", "h100x8x2n", "h100x8x4n", "h100:3g.40gb"]


@pytest.mark.parametrize(
    ("req", "args"),
    [
        ({"slice": "3g.40gb"}, ["--nodes=1", "--gres=gpu:h100_3g.40gb:1"]),
        ({"gpus": 2}, ["--nodes=1", "--gres=gpu:h100:2"]),
        ({"gpus": 8}, ["--nodes=1", "--gres=gpu:h100:8", "--exclusive"]),
        (
            {"kind": "torch", "gpus": 8, "nodes": 3},
            ["--nodes=3", "--gres=gpu:h100:8", "--exclusive"],
        ),
    ],
)
def test_sizes_render_to_slurm(req: dict[str, Any], args: list[str]) -> None:
    r = resolve(SITE, parse_request(req))
    assert r.size.slurm_args(r.node_type) == args


@pytest.mark.parametrize(
    ("req", "message"),
    [
        ({"kind": "torch", "slice": "3g.40gb", "count": 2}, "MIG slices have no NVLink"),
        (
            {"kind": "torch", "slice": "3g.40gb", "nodes": 2},
            "a MIG slice lives on one GPU of one node",
        ),
        ({"slice": "3g.40gb", "gpus": 1}, "either a MIG slice or whole GPUs"),
        ({"kind": "torch", "gpus": 4, "nodes": 2}, "sizes of several nodes take whole 8-GPU nodes"),
        ({"kind": "torch", "gpus": 8, "nodes": 5}, "cannot give 5 node(s)"),
        ({"gpus": 3}, "gpus must be 1, 2, 4 or 8"),
        ({"accelerator": "b200"}, "has no b200"),
        ({"slice": "1g.10gb"}, "offers: h100x1, h100x2"),
        ({"partition": "gpu-de"}, "no partition 'gpu-de'; this site has: gpu-fr"),
        ({"walltime_minutes": 601}, "over partition 'gpu-fr''s limit of 600 min"),
        ({"kind": "notebook", "count": 2}, "count must be 1"),
    ],
)
def test_impossible_requests_say_what_is_allowed(req: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError) as e:
        resolve(SITE, parse_request(req))
    assert message in str(e.value)


@pytest.mark.parametrize(
    "raw",
    [
        {"gpus": True},
        {"gpus": 1.0},
        {"gpus": [1]},
        {"gpus": None, "extra": 1},
        {"partition": "gpu-fr\n#SBATCH --uid=0"},
        {"partition": "$(id)"},
        {"image": "`reboot`"},
        {"slice": "3g.40gb; rm -rf /"},
        {"walltime_minutes": 10**12},
        {"count": 0},
        {"nodes": -3},
        [],
        "gpus=2",
    ],
)
def test_hostile_input_is_rejected(raw: Any) -> None:
    with pytest.raises(RequestError):
        parse_request(raw)


def test_cost_of_a_slice_is_its_share() -> None:
    r = resolve(SITE, parse_request({"slice": "3g.40gb", "walltime_minutes": 60}))
    assert r.eur_per_hour == pytest.approx(2.0 * 3 / 7, abs=1e-3)
    assert r.gpu_hours == pytest.approx(3 / 7, abs=1e-3)


def test_cost_of_two_nodes() -> None:
    r = resolve(
        SITE, parse_request({"kind": "torch", "gpus": 8, "nodes": 2, "walltime_minutes": 30})
    )
    assert r.eur_per_hour == 32.0
    assert r.cost_json()["eur_max"] == 16.0
    assert r.gpu_hours == 8.0


def _with(path: list[Any], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(slurm_site())
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["partitions", 0, "backend"], "k8s", "partitions[0] (name='gpu-fr').backend"),
        (["partitions", 0, "jurisdiction", "country"], "France", "jurisdiction.country"),
        (["partitions", 0, "nodes", 0, "accelerator"], "a100", "nodes[0] (name='hgx-h100')"),
        (["partitions", 0, "nodes", 1, "mig"], [{"gpus": [0], "profiles": ["4g.40gb"] * 2}], "4g"),
        (["partitions", 0, "nodes", 1, "mig"], [{"gpus": [5], "profiles": ["7g.80gb"]}], "0..1"),
        (["partitions", 0, "price_eur_per_gpu_hour"], {"b200": 1.0}, "no price for 'h100'"),
        (["partitions", 0, "carbon_g_per_kwh"], -1, "carbon_g_per_kwh"),
        (["partitions", 0, "colour"], "blue", "colour: Extra inputs are not permitted"),
    ],
)
def test_bad_site_file_names_key_and_reason(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(SiteError) as e:
        parse_site(_with(path, value), "site.toml")
    assert str(e.value).startswith("site.toml: invalid site file")
    assert message in str(e.value)


def test_site_file_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('name = "x"\n[[partitions]]\nname = 3\n')
    with pytest.raises(
        SiteError, match=r"bad.toml: invalid site file\n  partitions\[0\] \(name=3\)\.name"
    ):
        load_site(f)
    f.write_text("name = \n")
    with pytest.raises(SiteError, match=r"bad\.toml: not valid TOML"):
        load_site(f)
    with pytest.raises(SiteError, match="site file not found"):
        load_site(tmp_path / "missing.toml")


def test_form_round_trip_and_unknown_fields() -> None:
    site = load_site()
    html = render_form(site.partitions)
    assert 'value="lab/h100:3g.40gb"' in html and 'max="480"' in html
    out = parse_form({"size": ["lab/h100x2"], "walltime_minutes": ["90"], "_xsrf": ["x"]})
    assert out == {"accelerator": "h100", "gpus": 2, "partition": "lab", "walltime_minutes": 90}
    assert resolve(site, parse_request(out)).size.id == "h100x2"
    with pytest.raises(RequestError, match="unknown form field"):
        parse_form({"size": ["lab/h100x2"], "uid": ["0"]})
    with pytest.raises(RequestError, match="whole number"):
        parse_form({"size": ["lab/h100x2"], "walltime_minutes": ["1e9"]})
    with pytest.raises(RequestError, match="given 2 times"):
        parse_form({"size": ["lab/h100x2", "lab/h100x4"]})


def test_form_escapes_site_text() -> None:
    data = slurm_site()
    data["partitions"][0]["jurisdiction"]["operator"] = '<script>alert("x")</script>'
    html = render_form(parse_site(data).partitions)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_allocator_is_exclusive() -> None:
    site = load_site()
    alloc = Allocator(declared_devices(site.partitions[0].nodes[0]))
    two = Size("hgx-h100", "h100", gpus_per_node=2)
    a = alloc.allocate("a", two)
    b = alloc.allocate("b", Size("hgx-h100", "h100", gpus_per_node=4))
    assert not {d.id for d in a} & {d.id for d in b}
    with pytest.raises(AllocationError, match="0 of 2 device"):
        alloc.allocate("c", two)
    with pytest.raises(AllocationError, match="already held"):
        alloc.claim("c", [a[0].id])
    assert sorted(alloc.release("a")) == sorted(d.id for d in a)
    assert alloc.allocate("c", two) == a


# -- property: every size renders consistently ------------------------------------------------
@st.composite
def sites(draw: st.DrawFn) -> dict[str, Any]:
    acc = draw(st.sampled_from(sorted(ACCELERATORS)))
    a = ACCELERATORS[acc]
    gpus = draw(st.sampled_from([1, 2, 4, 8]))
    n_mig = draw(st.integers(0, gpus))
    layouts = []
    for g in range(n_mig):
        profs = draw(st.lists(st.sampled_from([p.name for p in a.mig_profiles]), min_size=1))
        layouts.append({"gpus": [g], "profiles": profs})
    return {
        "name": "gen",
        "partitions": [
            {
                "name": "p",
                "backend": draw(st.sampled_from(["local", "slurm"])),
                "jurisdiction": {"country": "DE", "operator": "x"},
                "price_eur_per_gpu_hour": {acc: 1.5},
                "carbon_g_per_kwh": 300,
                "nodes": [{"name": "n", "accelerator": acc, "gpus": gpus, "mig": layouts}],
            }
        ],
    }


@settings(max_examples=200, deadline=None)
@given(data=sites())
def test_every_generated_size_renders_consistently(data: dict[str, Any]) -> None:
    try:
        site = parse_site(data)
    except SiteError as e:
        assert "slices" in str(e) or "fit on one GPU" in str(e) or "'+me'" in str(e)
        return
    part = site.partitions[0]
    nt = part.nodes[0]
    alloc = Allocator(declared_devices(nt))
    for size in partition_sizes(part):
        args = size.slurm_args(nt)
        gres = next(a for a in args if a.startswith("--gres=gpu:"))
        count = int(gres.rsplit(":", 1)[1])
        assert count == size.devices_per_node
        assert f"--nodes={size.nodes}" in args
        if size.slice:
            assert gres == f"--gres=gpu:{nt.accelerator}_{size.slice}:1"
            assert size.slice in nt.slices_per_node()
        else:
            assert size.gpus_per_node <= len(nt.whole_gpus) <= GPUS_PER_HGX_NODE
        # The same request comes back to the same size through the form id.
        req = parse_request(request_from_size_id(size.id, partition="p"))
        assert resolve(site, req).size == size
        # A single-node size can really be handed out by the local allocator.
        if size.nodes == 1:
            got = alloc.allocate("probe", size)
            assert len(got) == size.devices_per_node
            assert all(d.slice == size.slice for d in got)
            alloc.release("probe")


def test_up_names_a_missing_dependency() -> None:
    from sovereign_portal.hub.up import UpError, find_tool

    with pytest.raises(UpError, match=r"no-such-proxy is not installed\. Run scripts/install\.sh"):
        find_tool("no-such-proxy")
