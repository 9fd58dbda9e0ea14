"""Sweeps under ``torchrun``: two CPU processes (gloo) give what one process gives, share the work, and
fail together (never hang) when a rank fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_worker import SPREAD, smollm2_inputs, sweeps, toy_inputs

from minterp_tl import _patch_engine, distributed, load_model
from minterp_tl._patch_engine import agreed_budget
from minterp_tl.cli import main
from minterp_tl.distributed import RankFailed, World, _decode, _encode, replica_gpus

WORKER = Path(__file__).with_name("distributed_worker.py")
FAMILIES = ("gpt2", "gpt_neox", "gemma2")
"""Families also swept under torchrun: Conv1D weights, parallel blocks, post-norms with soft-capping."""


def torchrun(args: list[str], tmp_path: Path, timeout: float = 300, **env: str) -> tuple[int, str, float]:
    """Run ``torchrun --standalone --nproc_per_node 2 ARGS``; its exit code, output and seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        env={
            "GLOO_SOCKET_IFNAME": "lo",  # one host: loopback, whatever the host name resolves to
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(WORKER.parent),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


@pytest.fixture(scope="module")
def launched(smollm2, hf_model, tmp_path_factory):
    """The worker's ``sweeps`` job run once under torchrun: each rank's results."""
    out = tmp_path_factory.mktemp("distributed")
    folder = hf_model.folder("llama")
    families = [f"{name}={hf_model.folder(name)}" for name in FAMILIES]
    code, output, _ = torchrun([str(WORKER), "sweeps", str(out), folder, *families], out)
    assert code == 0, output[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)], folder


def _one_thread(fn):
    """``fn()`` with one intra-op thread, as each torchrun rank has (so kernels sum in the same order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def test_two_ranks_equal_one_process(launched, toys, smollm2) -> None:
    ranks, _ = launched
    assert [r["world"] for r in ranks] == [(0, 2), (1, 2)]
    for name, model, inputs, small in (
        ("toy", toys["gqa"], toy_inputs, True),
        ("smollm2", smollm2, smollm2_inputs, False),
    ):
        ref = _one_thread(lambda: sweeps(model, *inputs(model), small=small))
        for key, want in ref.items():
            for rank in ranks:  # every rank returns the whole result
                _same(rank[name][key], want, exact=(name, key) in EXACT)


EXACT = {("toy", "resid_pre"), ("toy", "heads"), ("toy", "edge_patch"), ("smollm2", "resid_pre")}
EXACT |= {("toy", "eap"), ("toy", "attribution_one_prompt")}
"""The sweeps whose plan had at least two chunks per rank (each chunk ran exactly as in one process), and
those rank 0 ran alone (one integration step, one prompt)."""


def _same(got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    """``torch.equal`` where every chunk ran as in one process; else to 1e-6 of the values' size: the
    work was cut differently (smaller patching chunks, a rank's share of the prompts or of the
    integration steps), and a smaller batch alone moves SmolLM2's logits by ~2e-6 of their size."""
    assert got.shape == want.shape
    if exact:
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        assert float((got - want).abs().max()) <= 2e-6 * max(1.0, float(want.abs().max()))


def test_the_ranks_share_the_forwards(launched, toys, monkeypatch) -> None:
    ranks, _ = launched
    toy = [r["toy_forwards"] for r in ranks]
    smol = [r["smollm2_forwards"] for r in ranks]
    assert min(toy) > 0 and min(smol) > 0, (toy, smol)  # both ranks ran chunks
    count = [0]
    plain = _patch_engine._forward

    def counted(*args, **kwargs):
        count[0] += 1
        return plain(*args, **kwargs)

    monkeypatch.setattr(_patch_engine, "_forward", counted)
    sweeps(toys["gqa"], *toy_inputs(toys["gqa"]), small=True)
    assert sum(toy) == count[0]  # split, not replicated: one process runs the same forwards


def test_a_model_over_two_devices_per_rank(launched, hf_model) -> None:
    ranks, folder = launched
    spread = load_model(folder, progress=False, device_map=SPREAD, offload_folder=str(Path(folder) / "off"))
    assert spread.cfg.n_devices == 2 and all(r["n_devices"] == 2 for r in ranks)
    model = hf_model("llama")  # the same weights on one device, one process
    ref = _one_thread(lambda: sweeps(model, *toy_inputs(model), small=False))
    for rank in ranks:
        for key, want in ref.items():
            _same(rank["spread"][key], want, exact=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_other_families_under_torchrun(launched, hf_model, family: str) -> None:
    ranks, _ = launched
    model = hf_model(family)
    ref = _one_thread(lambda: sweeps(model, *toy_inputs(model), small=False))
    for rank in ranks:
        for key, want in ref.items():
            _same(rank[f"family:{family}"][key], want, exact=False)


def test_a_failing_rank_fails_the_run_with_its_error(tmp_path) -> None:
    code, output, seconds = torchrun([str(WORKER), "raise", str(tmp_path)], tmp_path, timeout=240)
    assert code != 0
    assert "metric failed on purpose on rank 1" in output
    assert "RankFailed: rank 1 of 2 failed: ValueError: metric failed on purpose on rank 1" in output
    assert not list(tmp_path.glob("rank*.pt"))  # no rank went on as if nothing had happened
    assert seconds < 200


def test_a_silent_rank_times_out_instead_of_hanging(tmp_path) -> None:
    code, output, seconds = torchrun(
        [str(WORKER), "hang", str(tmp_path)], tmp_path, timeout=240, MINTERP_TL_DIST_TIMEOUT="5"
    )
    assert code != 0
    assert "no answer from the other ranks within 5 s" in output
    assert seconds < 200  # rank 1 sleeps 600 s: the run ended on rank 0's timeout


def test_cli_patch_under_torchrun_prints_once(smollm2, tmp_path, capsys) -> None:
    args = ["patch", "--layers", "-2:", "--no-progress", "--out", "patch.png"]
    code, output, _ = torchrun(["-m", "minterp_tl.cli", *args], tmp_path)
    assert code == 0, output[-3000:]
    assert output.count("strongest cells") == 1 and output.count("heatmap written to") == 1
    assert (tmp_path / "patch.png").stat().st_size > 0
    assert main([*args[:-1], str(tmp_path / "one.png")]) == 0
    alone = capsys.readouterr().out
    table = [line for line in alone.splitlines() if line.startswith(" ") or line.startswith("L")]
    assert table and all(line in output for line in table)


# --------------------------------------------------------------------------------------------------
# One process: nothing distributed happens; the rules of sharing
# --------------------------------------------------------------------------------------------------


def test_one_process_touches_no_collective(toys, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a collective ran in a single process")

    monkeypatch.setattr(dist, "all_gather", refuse)
    monkeypatch.setattr(dist, "init_process_group", refuse)
    model = toys["ln"]
    clean, corrupted, metric = toy_inputs(model)
    assert distributed.world() == World() and not dist.is_initialized()
    out = sweeps(model, clean, corrupted, metric, small=True)
    assert out["resid_pre"].shape == (model.cfg.n_layers, 6)
    assert agreed_budget(model, None) is None


@pytest.mark.parametrize("size", [2, 3, 8])
def test_share_covers_every_item_once_and_balances(size: int) -> None:
    costs = [9.0, 1.0, 4.0, 4.0, 3.0, 7.0, 2.0, 2.0, 5.0, 1.0, 6.0]
    shares = [World(r, size).share(costs) for r in range(size)]
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs)  # greedy: no rank ends more than one item behind
    rows = [World(r, size).rows(7) for r in range(size)]
    assert [i for s in rows for i in range(7)[s]] == list(range(7))
    assert max(s.stop - s.start for s in rows) - min(s.stop - s.start for s in rows) <= 1


def test_memory_budget_is_shared_by_the_ranks_on_one_device(monkeypatch) -> None:
    world = World(0, 3)
    answers = [("a", "cpu", 40 * 2**30), ("a", "cpu", 44 * 2**30), ("b", "cpu", 8 * 2**30)]
    monkeypatch.setattr(World, "exchange", lambda self, local: answers)
    # host a: two ranks share 40 GiB -> 5 GiB each; host b: one rank, 8 GiB -> 2 GiB: the least wins
    assert world.memory_budget(lambda device: 0, torch.device("cpu")) == 2 * 2**30


def test_exchange_reports_another_ranks_error(monkeypatch) -> None:
    def gather(self, data):  # rank 1 failed; this rank's own message in its place
        other = _encode(("error", "ValueError: bad prompt"))
        return [data, other] if self.rank == 0 else [other, data]

    monkeypatch.setattr(World, "_all_gather_bytes", gather)
    with pytest.raises(RankFailed, match="rank 1 of 2 failed: ValueError: bad prompt"):
        World(0, 2).exchange(lambda: 1)
    with pytest.raises(KeyError, match="own"):  # the failing rank raises its own error
        World(1, 2).exchange(lambda: {}["own"])
    monkeypatch.setattr(World, "_all_gather_bytes", lambda self, data: [data, data[:-1]])
    with pytest.raises(RankFailed, match="a malformed message from rank 1"):
        World(0, 2).exchange(lambda: ("ok", 1))


def test_messages_carry_json_and_tensors_only() -> None:
    obj = {3: torch.tensor([1.5, float("nan")]), "a": [1, 0.1 + 0.2, None, True, "x", (torch.zeros(0, 3),)]}
    out = _decode(_encode(obj), 0)
    assert list(out) == [3, "a"] and torch.equal(out[3][:1], obj[3][:1]) and out[3][1].isnan()
    assert out["a"][:5] == [1, 0.1 + 0.2, None, True, "x"] and out["a"][5][0].shape == (0, 3)
    bf = torch.randn(2, 3).to(torch.bfloat16)
    assert torch.equal(_decode(_encode(bf), 0), bf)
    with pytest.raises(TypeError, match="cannot send a object"):
        _encode(object())  # nothing that would need pickle
    header = json.dumps({"t": ["Tensor", [1]]}).encode()
    with pytest.raises(RankFailed, match="malformed message from rank 2"):
        _decode(len(header).to_bytes(8, "little") + header, 2)  # a dtype name is never looked up


def test_alone_runs_one_rank_as_one_process(toys, monkeypatch) -> None:
    monkeypatch.setattr(distributed, "_WORLD", World(1, 2))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    assert distributed.world() == World(1, 2)
    monkeypatch.setattr(World, "_all_gather_bytes", lambda self, data: pytest.fail("an exchange ran"))
    model = toys["gqa"]
    clean, corrupted, metric = toy_inputs(model)
    with distributed.alone():
        assert distributed.world() == World()
        out = sweeps(model, clean, corrupted, metric, small=True)
    with pytest.raises(pytest.fail.Exception, match="an exchange ran"):  # outside the block: rank 1 of 2
        sweeps(model, clean, corrupted, metric, small=True)
    monkeypatch.setattr(distributed, "_WORLD", World())
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    plain = sweeps(model, clean, corrupted, metric, small=True)  # one process
    assert all(torch.equal(out[key], plain[key]) for key in plain)


def test_bad_settings_are_refused(monkeypatch) -> None:
    for bad in (0, -5.0, True, "60"):
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            distributed.init(timeout=bad)
    monkeypatch.setenv("MINTERP_TL_DIST_TIMEOUT", "soon")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(distributed, "_WORLD", None)
    with pytest.raises(ValueError, match="MINTERP_TL_DIST_TIMEOUT must be a positive number"):
        distributed.init()
    assert not dist.is_initialized()


def test_local_device(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.local_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.local_device() == "cuda:1"  # local rank 3 of a host with 2 GPUs


def test_replica_gpus(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert replica_gpus(2, available=8) == [2, 3]
    with pytest.raises(ValueError, match="need 12 GPUs, but there are 8"):
        replica_gpus(3, available=8)
    with pytest.raises(ValueError, match="per_replica must be a positive integer"):
        replica_gpus(0, available=8)


def test_load_model_spread_options_are_checked() -> None:
    with pytest.raises(ValueError, match="max_memory and offload_folder need a device_map"):
        load_model("anything", max_memory={0: "1GiB"})
    with pytest.raises(ValueError, match="loads on one"):
        load_model("smollm2-135m", device_map="balanced")
