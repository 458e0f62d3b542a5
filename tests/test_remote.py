"""Remote sources (``https://``, ``hf://``) over real HTTP on 127.0.0.1: no mocks.

A :class:`fakehub.FakeHub` serves checkpoints written in this session under the Hub's
``/{org}/{repo}/resolve/{rev}/{file}`` paths (with a CDN redirect for some repositories)
and counts every request; ``paramctl`` runs in a subprocess with ``HF_ENDPOINT`` pointing
at it. Every request loop is bounded: paramctl tries 4 times at most, the back-off is
shortened with ``PARAMCTL_HTTP_BACKOFF``, and each subprocess has a timeout.

Request counts by design: a safetensors file 1 (2 when its header passes 100 KiB), a
sharded index 1 + one per shard, a torch zip 2 (the first 100 KiB holds data.pkl; the last
64 KiB the central directory), each doubled by a CDN redirect only for the first request.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakehub import FakeHub
from helpers import REPO, one_error_line, run_cli

from paramctl.sources.sharded import REMOTE_FETCHES

MIB = 1 << 20
TOKEN = "hf_test_token_123"


# -- checkpoints, written once --------------------------------------------------------------
def _save_safetensors(path: Path, tensors: dict[str, Any], frozen: list[str] | None = None
                      ) -> None:
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    if frozen:
        meta["paramctl.frozen"] = json.dumps(frozen)
    save_file(tensors, str(path), metadata=meta)


def _sharded(folder: Path, shards: int, per_shard: int, elems: int) -> None:
    import torch

    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"layers.{s}.w{i}": torch.full((elems,), float(i)) for i in range(per_shard)}
        _save_safetensors(folder / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="session")
def remote_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per repository (see the names below)."""
    import torch

    root = tmp_path_factory.mktemp("hub")
    # 16 MiB safetensors with a recorded frozen tensor.
    single = root / "single"
    single.mkdir()
    st = {"embed.weight": torch.zeros(2048, 1024),
          **{f"layers.{i}.weight": torch.zeros(512, 1024) for i in range(8)},
          **{f"layers.{i}.bias": torch.zeros(1024) for i in range(8)},
          "steps": torch.zeros(1, dtype=torch.int64)}
    _save_safetensors(single / "model.safetensors", st, frozen=["embed.weight"])
    # 4 shards of 8 MiB.
    sharded = root / "sharded"
    sharded.mkdir()
    _sharded(sharded, shards=4, per_shard=4, elems=512 * 1024)
    # A 16 MiB torch zip: a frozen Parameter, a tied pair, an integer buffer.
    torch_dir = root / "torch"
    torch_dir.mkdir()
    embed = torch.nn.Parameter(torch.zeros(2048, 1024), requires_grad=False)
    state: dict[str, Any] = {"embed.weight": embed, "lm_head.weight": embed}
    state.update({f"layers.{i}.weight": torch.zeros(512, 1024) for i in range(8)})
    state.update({f"layers.{i}.bias": torch.zeros(1024) for i in range(8)})
    state["bn.num_batches_tracked"] = torch.tensor(3)
    torch.save(state, torch_dir / "pytorch_model.bin")
    # A safetensors header over 100 KiB (3,000 tensors with long names).
    big = root / "bigheader"
    big.mkdir()
    _save_safetensors(big / "model.safetensors", {
        f"model.decoder.layers.{i}.self_attn.very_long_projection_name.weight": torch.zeros(2)
        for i in range(3000)})
    # A torch zip of 1,500 records (its central directory passes 64 KiB, data.pkl 100 KiB).
    many = root / "manyrecords"
    many.mkdir()
    torch.save({f"block.{i}.weight": torch.zeros(64) for i in range(1500)},
               many / "pytorch_model.bin")
    # Repositories for the choice of weights file.
    both = root / "both"  # index + shards and a model.safetensors: the index wins
    shutil.copytree(sharded, both)
    shutil.copyfile(single / "model.safetensors", both / "model.safetensors")
    st_and_bin = root / "st_and_bin"  # model.safetensors wins over pytorch_model.bin
    st_and_bin.mkdir()
    _save_safetensors(st_and_bin / "model.safetensors", {"a": torch.zeros(3)})
    torch.save({"b": torch.zeros(3)}, st_and_bin / "pytorch_model.bin")
    bin_only = root / "bin_only"
    bin_only.mkdir()
    torch.save({"c": torch.zeros(3)}, bin_only / "pytorch_model.bin")
    bin_index = root / "bin_index"
    bin_index.mkdir()
    torch.save({"d": torch.zeros(3)}, bin_index / "pytorch_model-00001-of-00001.bin")
    (bin_index / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"d": "pytorch_model-00001-of-00001.bin"}}))
    nothing = root / "nothing"
    nothing.mkdir()
    (nothing / "config.json").write_text("{}")
    (nothing / "empty.safetensors").write_bytes(b"")
    return root


@pytest.fixture
def hub(remote_root: Path) -> Iterator[FakeHub]:
    """A fresh server pair per test, stopped (stalled handlers released) at teardown."""
    server = FakeHub()
    for name in ("single", "sharded", "torch", "bigheader", "manyrecords", "both",
                 "st_and_bin", "bin_only", "bin_index", "nothing"):
        server.add_repo(f"org/{name}", remote_root / name, revisions=("main", "refs/pr/1"))
    server.add_repo("org/gated", remote_root / "torch", token=TOKEN, cdn=True)
    server.add_repo("org/cdn", remote_root / "sharded", cdn=True)
    with server:
        yield server


def paramctl(hub: FakeHub, *args: object, timeout: float = 60,
             **env: str) -> subprocess.CompletedProcess[str]:
    """``paramctl ARGS`` against ``hub``, with no token and no offline mode unless given."""
    base = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(REPO / "nonexistent-hf-home"),
            "HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": "", "HF_HUB_OFFLINE": "",
            "PARAMCTL_HTTP_BACKOFF": "0.01", "PARAMCTL_HTTP_TIMEOUT": "5,10"}
    return run_cli(*args, env={**base, **env}, timeout=timeout)


def listing(res: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def local_listing(path: Path, *extra: str) -> dict[str, Any]:
    return listing(run_cli("list", path, "-f", "json", *extra))


def without_source(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "source"}


def total_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


# -- listings equal the local ones, for a fraction of the bytes -------------------------------
@pytest.mark.parametrize(("repo", "file", "requests"), [
    ("single", "model.safetensors", 1),
    ("sharded", "model.safetensors.index.json", 1 + 4),
    ("torch", "pytorch_model.bin", 2),
])
def test_remote_list_equals_local_and_reads_only_metadata(
        hub: FakeHub, remote_root: Path, repo: str, file: str, requests: int) -> None:
    local = local_listing(remote_root / repo / file)
    doc = listing(paramctl(hub, "list", f"hf://org/{repo}/{file}", "-f", "json"))
    assert doc["source"] == f"hf://org/{repo}/{file}"
    assert without_source(doc) == without_source(local)
    assert len(hub.hits) == requests, hub.hits
    assert all(h.status == 206 for h in hub.hits)
    assert hub.bytes_sent() < 0.02 * total_size(remote_root / repo)


def test_the_remote_listing_shows_what_the_file_records(hub: FakeHub) -> None:
    params = {p["name"]: p for p in listing(paramctl(
        hub, "list", "hf://org/torch/pytorch_model.bin", "-f", "json"))["parameters"]}
    assert params["embed.weight"]["requires_grad"] is False
    assert params["embed.weight"]["tied"] == ["lm_head.weight"]
    assert params["bn.num_batches_tracked"]["requires_grad"] is False


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "names"])
def test_other_formats_and_the_tree_match_local(hub: FakeHub, remote_root: Path,
                                                fmt: str) -> None:
    for repo, file in (("single", "model.safetensors"), ("torch", "pytorch_model.bin")):
        spec = f"hf://org/{repo}/{file}"
        remote = paramctl(hub, "list", spec, "-f", fmt)
        local = run_cli("list", remote_root / repo / file, "-f", fmt)
        assert remote.returncode == 0, remote.stderr
        assert remote.stdout == local.stdout
        tree = paramctl(hub, "list", spec, "--tree", "-f", "json")
        local_tree = run_cli("list", remote_root / repo / file, "--tree", "-f", "json")
        assert without_source(listing(tree)) == without_source(listing(local_tree))


def test_patterns_and_filters_work_remotely(hub: FakeHub) -> None:
    res = paramctl(hub, "list", "hf://org/single/model.safetensors", "layers.1", "--trainable",
                   "-f", "names")
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split()) == ["layers.1.bias", "layers.1.weight"]
    res = paramctl(hub, "list", "hf://org/single/model.safetensors", "nothing_like_this")
    assert res.returncode == 3


def test_a_plain_url_reads_the_same_file(hub: FakeHub, remote_root: Path) -> None:
    local = local_listing(remote_root / "single" / "model.safetensors")
    url = hub.url("org/single", "model.safetensors")
    doc = listing(paramctl(hub, "list", url, "-f", "json"))
    assert doc["source"] == url
    assert without_source(doc) == without_source(local)
    assert len(hub.hits) == 1


def test_a_header_over_100_kib_costs_a_second_request(hub: FakeHub,
                                                      remote_root: Path) -> None:
    path = remote_root / "bigheader" / "model.safetensors"
    assert int.from_bytes(path.read_bytes()[:8], "little") > 100 * 1024
    doc = listing(paramctl(hub, "list", "hf://org/bigheader/model.safetensors", "-f", "json"))
    assert len(doc["parameters"]) == 3000
    assert len(hub.hits) == 2
    assert hub.hits[0].range == "bytes=0-102399"
    # The second asks only for the part of the header the first did not bring.
    assert hub.hits[1].range is not None and hub.hits[1].range.startswith("bytes=102400-")


def test_a_zip_of_many_records_costs_a_few_requests_not_one_per_record(
        hub: FakeHub, remote_root: Path) -> None:
    local = local_listing(remote_root / "manyrecords" / "pytorch_model.bin")
    doc = listing(paramctl(hub, "list", "hf://org/manyrecords/pytorch_model.bin", "-f", "json"))
    assert without_source(doc) == without_source(local)
    assert len(doc["parameters"]) == 1500
    # head, tail (EOCD), the rest of the central directory, the rest of data.pkl
    assert len(hub.hits) <= 4, hub.hits


# -- hf://ORG/REPO: which file ---------------------------------------------------------------
@pytest.mark.parametrize(("repo", "picked", "probes"), [
    ("both", "model.safetensors.index.json", 0),
    ("sharded", "model.safetensors.index.json", 0),
    ("single", "model.safetensors", 1),
    ("st_and_bin", "model.safetensors", 1),
    ("bin_only", "pytorch_model.bin", 3),
])
def test_a_repository_spec_picks_its_weights_file(hub: FakeHub, repo: str, picked: str,
                                                  probes: int) -> None:
    doc = listing(paramctl(hub, "list", f"hf://org/{repo}", "-f", "json"))
    assert doc["source"] == f"hf://org/{repo}/{picked}"
    assert [h.status for h in hub.hits].count(404) == probes
    # The probe that found the file is its first read: it is not fetched again.
    assert len(hub.hits_for(picked)) == 1


def test_a_repository_without_weights_names_what_was_tried(hub: FakeHub) -> None:
    res = paramctl(hub, "list", "hf://org/nothing")
    line = one_error_line(res)
    assert res.returncode == 1
    assert line == ("error: hf://org/nothing: no weights file found (tried "
                    "model.safetensors.index.json, model.safetensors, "
                    "pytorch_model.bin.index.json, pytorch_model.bin: HTTP 404 each); "
                    "name the file: hf://org/nothing/FILE")
    assert len(hub.hits) == 4


def test_a_sharded_bin_index_lists_remotely(hub: FakeHub, remote_root: Path) -> None:
    res = paramctl(hub, "list", "hf://org/bin_index")
    assert res.returncode == 0, res.stderr
    assert res.stdout == run_cli("list", remote_root / "bin_index").stdout


def test_a_revision_is_sent_url_encoded(hub: FakeHub, remote_root: Path) -> None:
    local = local_listing(remote_root / "single" / "model.safetensors")
    for spec in ("hf://org/single@refs/pr/1/model.safetensors",
                 "hf://org/single@refs%2Fpr%2F1/model.safetensors", "hf://org/single@refs/pr/1"):
        hub.reset()
        doc = listing(paramctl(hub, "list", spec, "-f", "json"))
        assert without_source(doc) == without_source(local)
    res = paramctl(hub, "list", "hf://org/single@nope/model.safetensors")
    assert one_error_line(res) == ("error: hf://org/single@nope/model.safetensors: revision "
                                   "'nope' not found (HTTP 404)")


def test_a_sharded_index_on_a_revision_reads_its_shards_there(hub: FakeHub) -> None:
    doc = listing(paramctl(hub, "list", "hf://org/sharded@refs/pr/1", "-f", "json"))
    assert len(doc["parameters"]) == 16
    assert len(hub.hits) == 5


def test_a_missing_repository_or_file_is_named(hub: FakeHub) -> None:
    res = paramctl(hub, "list", "hf://org/nope")
    assert one_error_line(res) == "error: hf://org/nope: repository org/nope not found (HTTP 404)"
    assert res.returncode == 1
    assert len(hub.hits) == 1  # no use probing the other names
    res = paramctl(hub, "list", "hf://org/single/other.safetensors")
    assert one_error_line(res) == ("error: hf://org/single/other.safetensors: no such file in "
                                   "org/single at revision 'main' (HTTP 404)")


@pytest.mark.parametrize("spec", ["hf://justone", "hf://org/re po", "hf://org/repo@/x"])
def test_a_malformed_hf_spec_is_a_usage_error(hub: FakeHub, spec: str) -> None:
    res = paramctl(hub, "list", spec)
    assert res.returncode == 2
    assert one_error_line(res).startswith(f"error: bad hf:// spec {spec!r}: expected "
                                          "hf://ORG/REPO[@REVISION][/PATH]")
    assert hub.hits == []


def test_an_unknown_remote_file_type_is_named(hub: FakeHub) -> None:
    res = paramctl(hub, "list", hub.url("org/nothing", "config.json"))
    assert res.returncode == 1
    assert "unknown remote file type" in one_error_line(res)
    assert hub.hits == []


def test_an_empty_remote_file_is_reported_as_such(hub: FakeHub) -> None:
    res = paramctl(hub, "list", "hf://org/nothing/empty.safetensors")
    assert one_error_line(res) == "error: hf://org/nothing/empty.safetensors: the file is empty"


# -- sharded: concurrency, failures -----------------------------------------------------------
def test_shard_headers_are_fetched_concurrently_and_bounded(hub: FakeHub) -> None:
    hub.latency = 0.2
    doc = listing(paramctl(hub, "list", "hf://org/sharded", "-f", "json"))
    assert len(doc["parameters"]) == 16
    assert 2 <= hub.max_in_flight <= REMOTE_FETCHES


def test_a_missing_shard_is_named_and_the_rest_stop(hub: FakeHub) -> None:
    shard = "model-00002-of-00004.safetensors"
    hub.fault("org/sharded", shard, "404", forever=True)
    res = paramctl(hub, "list", "hf://org/sharded")
    assert res.returncode == 1
    assert one_error_line(res) == (f"error: hf://org/sharded/{shard}: no such file in "
                                   "org/sharded at revision 'main' (HTTP 404)")
    assert len(hub.hits) <= 1 + 4


# -- redirects and the token -------------------------------------------------------------------
def test_the_token_goes_to_the_hub_and_not_to_the_cdn(hub: FakeHub, remote_root: Path) -> None:
    local = local_listing(remote_root / "torch" / "pytorch_model.bin")
    doc = listing(paramctl(hub, "list", "hf://org/gated/pytorch_model.bin", "-f", "json",
                           HF_TOKEN=TOKEN))
    assert without_source(doc) == without_source(local)
    hub_hits = [h for h in hub.hits if h.server == "hub"]
    cdn_hits = [h for h in hub.hits if h.server == "cdn"]
    assert [h.status for h in hub_hits] == [302]
    assert hub_hits[0].authorization == f"Bearer {TOKEN}"
    # The redirect is followed with the Range re-sent, then the CDN is asked directly.
    assert [h.status for h in cdn_hits] == [206, 206]
    assert cdn_hits[0].range == hub_hits[0].range
    assert all(h.authorization is None for h in cdn_hits)


def test_the_token_file_is_used_when_hf_token_is_unset(hub: FakeHub, tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    res = paramctl(hub, "list", "hf://org/gated/pytorch_model.bin", HF_HOME=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert hub.hits[0].authorization == f"Bearer {TOKEN}"


def test_a_sharded_repo_behind_a_cdn_redirect(hub: FakeHub, remote_root: Path) -> None:
    local = local_listing(remote_root / "sharded")
    doc = listing(paramctl(hub, "list", "hf://org/cdn", "-f", "json"))
    assert without_source(doc) == without_source(local)
    assert [h.status for h in hub.hits if h.server == "hub"] == [302] * 5
    assert len([h for h in hub.hits if h.server == "cdn"]) == 5


def test_no_token_on_a_gated_repository(hub: FakeHub) -> None:
    res = paramctl(hub, "list", "hf://org/gated/pytorch_model.bin")
    assert res.returncode == 1
    assert one_error_line(res) == ("error: hf://org/gated/pytorch_model.bin: gated or private "
                                   "repository (HTTP 401): set HF_TOKEN")
    assert len(hub.hits) == 1


def test_a_token_without_access(hub: FakeHub) -> None:
    res = paramctl(hub, "list", "hf://org/gated", HF_TOKEN="hf_wrong")
    assert res.returncode == 1
    assert one_error_line(res) == (
        "error: hf://org/gated: gated or private repository (HTTP 403): the token has no "
        "access to it; request access on the repository's page")
    assert len(hub.hits) == 1


@pytest.mark.parametrize("status", ["401", "403"])
def test_access_denied_by_the_server(hub: FakeHub, status: str) -> None:
    hub.fault("org/single", "model.safetensors", status)
    res = paramctl(hub, "list", "hf://org/single/model.safetensors")
    assert one_error_line(res) == (f"error: hf://org/single/model.safetensors: gated or "
                                   f"private repository (HTTP {status}): set HF_TOKEN")
    assert len(hub.hits) == 1  # not retried


def test_the_token_is_sent_only_to_the_endpoint_host(hub: FakeHub) -> None:
    cdn_url = f"{hub.cdn_endpoint}/cdn/org/single/main/model.safetensors"
    assert paramctl(hub, "list", cdn_url, HF_TOKEN=TOKEN).returncode == 0
    assert [h.authorization for h in hub.hits] == [None]
    assert paramctl(hub, "list", hub.url("org/single", "model.safetensors"),
                    HF_TOKEN=TOKEN).returncode == 0
    assert hub.hits[-1].authorization == f"Bearer {TOKEN}"


# -- transient failures: retried, bounded ---------------------------------------------------
@pytest.mark.parametrize("faults", [["429"], ["500"], ["503", "502"], ["truncate"], ["429:1"]])
def test_transient_failures_are_retried(hub: FakeHub, remote_root: Path,
                                        faults: list[str]) -> None:
    hub.fault("org/single", "model.safetensors", *faults)
    local = local_listing(remote_root / "single" / "model.safetensors")
    started = time.monotonic()
    doc = listing(paramctl(hub, "list", "hf://org/single/model.safetensors", "-f", "json"))
    assert without_source(doc) == without_source(local)
    assert len(hub.hits) == len(faults) + 1
    if faults == ["429:1"]:  # Retry-After: 1 is honoured over the 0.01 s back-off
        assert time.monotonic() - started >= 1.0


def test_a_permanent_server_error_gives_up_after_four_tries(hub: FakeHub) -> None:
    hub.fault("org/single", "model.safetensors", "500", forever=True)
    res = paramctl(hub, "list", "hf://org/single/model.safetensors")
    assert res.returncode == 1
    assert one_error_line(res) == ("error: hf://org/single/model.safetensors: HTTP 500 "
                                   "Internal Server Error, after 4 tries")
    assert len(hub.hits) == 4


def test_a_long_retry_after_is_not_waited_for(hub: FakeHub) -> None:
    hub.fault("org/single", "model.safetensors", "429:3600", forever=True)
    res = paramctl(hub, "list", "hf://org/single/model.safetensors")
    assert one_error_line(res) == ("error: hf://org/single/model.safetensors: HTTP 429 Too Many "
                                   "Requests (the server asks to retry after 3600 s)")
    assert len(hub.hits) == 1


def test_a_body_that_is_always_truncated_is_a_corrupt_read(hub: FakeHub) -> None:
    hub.fault("org/torch", "pytorch_model.bin", "truncate", forever=True)
    res = paramctl(hub, "list", "hf://org/torch/pytorch_model.bin")
    assert res.returncode == 1
    assert one_error_line(res) == ("error: hf://org/torch/pytorch_model.bin: truncated response "
                                   "(51200 of 102400 bytes), after 4 tries")
    assert len(hub.hits) == 4


def test_a_stalled_server_times_out(hub: FakeHub) -> None:
    hub.fault("org/single", "model.safetensors", "stall", forever=True)
    started = time.monotonic()
    res = paramctl(hub, "list", "hf://org/single/model.safetensors", timeout=30,
                   PARAMCTL_HTTP_TIMEOUT="0.3")
    elapsed = time.monotonic() - started
    assert res.returncode == 1
    assert one_error_line(res) == ("error: hf://org/single/model.safetensors: no answer within "
                                   "0.3 s, after 4 tries")
    assert elapsed < 15
    assert len(hub.hits_for("model.safetensors")) <= 4


def test_an_unreachable_server(hub: FakeHub) -> None:
    hub.stop()
    res = paramctl(hub, "list", "hf://org/single/model.safetensors")
    assert res.returncode == 1
    line = one_error_line(res)
    assert line.startswith("error: hf://org/single/model.safetensors: connection to 127.0.0.1:")
    assert line.endswith("failed: Connection refused, after 4 tries")


def test_a_server_without_range_support(hub: FakeHub, remote_root: Path) -> None:
    hub.fault("org/st_and_bin", "model.safetensors", "norange")
    doc = listing(paramctl(hub, "list", "hf://org/st_and_bin/model.safetensors", "-f", "json"))
    assert [p["name"] for p in doc["parameters"]] == ["a"]  # a small file: taken whole
    hub.fault("org/single", "model.safetensors", "norange", forever=True)
    res = paramctl(hub, "list", "hf://org/single/model.safetensors")
    assert res.returncode == 1
    assert "the server does not answer range requests" in one_error_line(res)
    assert hub.bytes_sent("model.safetensors") < 4 * MIB  # the body was not read


# -- offline, read-only ----------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["hf://org/single", "https://example.invalid/m.safetensors"])
def test_offline_mode_disables_remote_sources(hub: FakeHub, spec: str) -> None:
    res = paramctl(hub, "list", spec, HF_HUB_OFFLINE="1")
    assert res.returncode == 1
    assert one_error_line(res) == ("error: HF_HUB_OFFLINE is set: remote sources are disabled; "
                                   "unset it or download the files")
    assert hub.hits == []


@pytest.mark.parametrize("args", [
    ["freeze", "hf://org/single/model.safetensors", "layers.0"],
    ["unfreeze", "hf://org/torch", "embed"],
    ["init", "hf://org/single/model.safetensors", "*.bias=zeros"],
    ["freeze", "hf://org/single/model.safetensors", "layers.0", "-o", "out.safetensors"],
])
def test_writes_are_refused_before_any_request(hub: FakeHub, args: list[str]) -> None:
    res = paramctl(hub, *args)
    assert res.returncode == 2
    assert one_error_line(res) == f"error: {args[1]}: remote sources are read-only; download first"
    assert hub.hits == []


def test_apply_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nfreeze = ["layers.*"]\n')
    res = paramctl(hub, "apply", "hf://org/single/model.safetensors", rules)
    assert res.returncode == 2
    assert "remote sources are read-only; download first" in one_error_line(res)
    assert hub.hits == []


def test_a_dry_run_freeze_reads_only_metadata(hub: FakeHub) -> None:
    res = paramctl(hub, "freeze", "hf://org/single/model.safetensors", "layers.0", "--dry-run",
                   "-f", "json")
    assert res.returncode == 0, res.stderr
    assert "layers.0.weight" in res.stdout
    assert len(hub.hits) == 1


def test_value_reads_are_refused_in_the_api(hub: FakeHub, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    import torch

    import paramctl as api
    from paramctl.errors import UsageError

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(REPO / "nonexistent-hf-home"))
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = torch.nn.Linear(2, 2)
    for spec in ("hf://org/single/model.safetensors", "hf://org/torch", "hf://org/sharded"):
        with pytest.raises(UsageError, match="remote sources are read-only; download first"):
            api.load_state_dict(model, spec)


def test_unsafe_load_is_refused_remotely(hub: FakeHub, remote_root: Path,
                                         tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    import torch

    torch.save({"w": torch.zeros(2)}, legacy / "old.pt", _use_new_zipfile_serialization=False)
    hub.add_repo("org/legacy", legacy)
    res = paramctl(hub, "list", "hf://org/legacy/old.pt")
    assert res.returncode == 1
    assert "legacy (pre-1.6, non-zip) torch format" in one_error_line(res)
    res = paramctl(hub, "list", "hf://org/legacy/old.pt", "--unsafe-load")
    assert res.returncode == 2
    assert one_error_line(res, ignore_warnings=True) == (
        "error: hf://org/legacy/old.pt: remote sources are read-only; download first")


# -- start-up: a local command loads no HTTP machinery ---------------------------------------
def test_a_local_listing_imports_no_http_client(remote_root: Path) -> None:
    local = str(remote_root / "single" / "model.safetensors")
    probe = ("import os, sys, runpy\n"
             # `list` leaves with os._exit (no teardown); the probe has more to do.
             "def _exit(code):\n"
             "    raise SystemExit(code)\n"
             "os._exit = _exit\n"
             f"sys.argv = ['paramctl', 'list', {local!r}, '-f', 'json']\n"
             "try:\n"
             "    runpy.run_module('paramctl', run_name='__main__')\n"
             "except SystemExit as exc:\n"
             "    assert exc.code in (0, None), exc.code\n"
             "loaded = [m for m in ('http.client', 'ssl', 'socket', 'paramctl.io.http')"
             " if m in sys.modules]\n"
             "sys.stderr.write('LOADED %r\\n' % loaded)\n")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().splitlines()[-1] == "LOADED []"


def test_mem_and_structure_diff_work_remotely(hub: FakeHub, remote_root: Path) -> None:
    remote = paramctl(hub, "mem", "hf://org/single", "--optimizer", "adamw", "-f", "json")
    local = run_cli("mem", remote_root / "single" / "model.safetensors", "-f", "json")
    assert remote.returncode == 0, remote.stderr
    got, want = json.loads(remote.stdout), json.loads(local.stdout)
    assert got["bytes"] == want["bytes"] and got["params"] == want["params"]
    diff = paramctl(hub, "diff", "hf://org/single",
                    remote_root / "single" / "model.safetensors", "--structure-only",
                    "-f", "json")
    assert diff.returncode == 0, diff.stderr
    assert {r["status"] for r in json.loads(diff.stdout)["tensors"]} == {"present"}


@pytest.mark.parametrize("args", [["stats", "hf://org/single"],
                                  ["diff", "hf://org/single", "hf://org/single"],
                                  ["convert", "hf://org/single", "--cast", "bf16", "-o",
                                   "x.safetensors"]])
def test_value_reads_and_conversions_are_refused(hub: FakeHub, args: list[str]) -> None:
    res = paramctl(hub, *args)
    assert res.returncode == 2, res.stderr
    assert "remote sources are read-only; download first" in one_error_line(res)
