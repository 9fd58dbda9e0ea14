"""The minterp-tl command line, run as a subprocess: every subcommand's printed numbers against an
independent computation in this process, the PNG it writes, and bad input (exit code 2, one line).

The subprocesses (four load SmolLM2, about 25 s each) start together in a module fixture, two at a
time, while this process loads its own SmolLM2 and computes the references.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from minterp_tl.cli import CIRCUIT_TRAIN_LENGTHS, IOI_CLEAN, IOI_CORRUPTED, main
from minterp_tl.models import second_half_loss

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPT = "The capital of France is"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m minterp_tl.cli ARGS`` offline, one torch thread (several run at once)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "minterp_tl.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def _check_png(path: Path, min_size: int = 2_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > min_size, (path, len(data))
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"  # a whole PNG, not a truncated one


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "error" not in result.stderr.lower(), result.stderr[-3000:]
    return result.stdout


def _one_error_line(stderr: str, message: str) -> None:
    """stderr is exactly one line, ``minterp-tl: error: ...``, and it contains ``message``."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minterp-tl: error: ") and message in lines[0], stderr


def _same_fields(printed: str, expected: str, tol: float) -> None:
    """Two lines with the same whitespace-separated fields, numbers equal within ``tol``."""
    a, b = printed.split(), expected.split()
    assert len(a) == len(b), (printed, expected)
    for x, y in zip(a, b):
        try:
            assert abs(float(x) - float(y)) <= tol, (printed, expected)
        except ValueError:
            assert x == y, (printed, expected)


BAD_INPUT = {  # name -> (args, the words the one error line must contain); none of these loads a model
    "empty prompt": (["patch", "  ", IOI_CORRUPTED, "--no-progress"], "the clean prompt is empty"),
    "bad spec": (
        ["patch", "--layers", "n//0:", "--no-progress"],
        "--layers: layer spec 'n//0:': division by zero",
    ),
    "unknown model": (
        ["patch", "--model", "/no/such/model-dir", "--no-progress"],
        "could not load model '/no/such/model-dir'",
    ),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict:
    """Start every subprocess run of this module (two at a time) and hand out their futures."""
    out = tmp_path_factory.mktemp("cli")
    jobs: dict[str, list[str]] = {
        "circuit": ["circuit", "--no-progress", "--out", str(out / "circuit.png")],
        "patch": [
            "patch",
            "--layers",
            "n//2:",
            "--positions",
            "-5:",
            "--normalize",
            "--top-k",
            "3",
            "--no-progress",
            "--out",
            str(out / "patch.png"),
        ],
        "routes": [
            "routes",
            PROMPT,
            "--top-k",
            "3",
            "--distance-norm",
            "2",
            "--no-progress",
            "--out",
            str(out / "routes.png"),
            "--json",
            str(out / "routes.json"),
        ],
        "lens": ["lens", PROMPT, "--no-progress", "--out", str(out / "lens.png")],
        "info": ["info", PROMPT, "--no-progress", "--out", str(out / "info.png")],
        **{f"bad: {name}": args for name, (args, _) in BAD_INPUT.items()},
    }
    pool = ThreadPoolExecutor(max_workers=2)
    futures: dict[str, Future] = {name: pool.submit(_run, *args) for name, args in jobs.items()}
    yield {"out": out, **futures}
    for future in futures.values():
        future.cancel()
    pool.shutdown(wait=True)


# --------------------------------------------------------------------------------------------
# circuit (first: it needs no SmolLM2, so the subprocesses start before this process loads one)
# --------------------------------------------------------------------------------------------


def test_circuit_prints_the_heads_and_losses_of_an_in_process_run(cli):
    from minterp_tl.circuits import CircuitConfig, find_subnetwork
    from minterp_tl.models import induction_report, repeated_random_tokens, train_induction_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subcommand: the same numbers, bit for bit
    try:
        model = train_induction_model(2, head_dropout=0.5, progress=False)
        gen = torch.Generator().manual_seed(1)
        train = [repeated_random_tokens(48, L, 64, gen) for L in CIRCUIT_TRAIN_LENGTHS]
        test = repeated_random_tokens(128, 11, 64, torch.Generator().manual_seed(5))
        hp = dict(ablation="none", mask_unit="head", mask_bias=False, mask_init_value=2.0)
        cfg = CircuitConfig("continuous_sparsification", hp, ("attn.W_O",), l0_lambda=0.15)
        circuit, _ = find_subnetwork(
            model, cfg, train, second_half_loss, steps=80, epochs=8, lr=0.1, progress=False
        )
        try:
            with torch.no_grad():
                heads = circuit.kept_heads()
                kept = float(second_half_loss(circuit(test), test))
                circuit.set_ablate_mode("zero_ablate")
                removed = float(second_half_loss(circuit(test), test))
                randoms = []
                for i in range(8):
                    circuit.set_ablate_mode("randomly_sampled", force_resample=True, seed=i)
                    randoms.append(float(second_half_loss(circuit(test), test)))
        finally:
            circuit.detach()
        with torch.no_grad():
            full = float(second_half_loss(model(test), test))
        report = induction_report(model, 11)
    finally:
        torch.set_num_threads(threads)

    out = _ok(cli["circuit"].result())
    printed = re.findall(r"^L(\d)H(\d)\s+(\S+)\s+(\S+)$", out, flags=re.M)
    assert [(int(l), int(h)) for l, h, _, _ in printed] == heads
    assert f"kept         {len(heads)} of 8 heads" in out
    for l, h, prev, ind in printed:
        assert abs(float(prev) - float(report.prev_token_scores[int(l), int(h)])) <= 1e-3
        assert abs(float(ind) - float(report.induction_scores[int(l), int(h)])) <= 1e-3
    losses = {
        m.group(1).strip(): float(m.group(2))
        for m in re.finditer(r"^([a-z].{31}) (\d+\.\d{4})$", out, flags=re.M)
    }
    assert losses == pytest.approx(
        {
            "full model": full,
            f"subnetwork ({len(heads)} heads)": kept,
            "subnetwork zero-ablated": removed,
            f"random {len(heads)} heads (mean of 8)": sum(randoms) / 8,
        },
        abs=1e-4,
    )
    # the redundant model's known result (tests/test_circuits.py): half the heads keep the task,
    # with a previous-token and an induction head; removing them breaks it
    assert len(heads) <= 4 and kept <= 1.10 * full and removed > 5 * full
    assert any(float(prev) > 0.5 for _, _, prev, _ in printed) and any(
        float(ind) > 0.5 for _, _, _, ind in printed
    )
    _check_png(cli["out"] / "circuit.png", min_size=1_000)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["circuit", "--model", "smollm2-135m"],
            "circuit --model must be one of induction-redundant, induction",
        ),
        (["circuit", "--steps", "3"], "--steps must be >= 8"),
        (["circuit", "--lambda", "nan"], "--lambda must be a finite number >= 0"),
        (["circuit", "--length", "40", "--no-progress"], "--length must be in 2..31"),
        (["circuit", "--out", "masks.svg"], "--out must be a .png path"),
    ],
)
def test_circuit_bad_input_exits_2_with_one_line(args, message, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(args) == 2
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_error_line(captured.err, message)


# --------------------------------------------------------------------------------------------
# patch
# --------------------------------------------------------------------------------------------


def test_patch_prints_the_strongest_cells_of_the_sweep(cli, smollm2):
    import pandas as pd
    from transformer_lens.patching import layer_pos_patch_setter

    from minterp_tl.patching import generic_activation_patch, logit_diff_metric

    clean, corrupted = smollm2.to_tokens(IOI_CLEAN), smollm2.to_tokens(IOI_CORRUPTED)
    names = [f"blocks.{l}.hook_resid_pre" for l in range(30)]
    with torch.no_grad():
        clean_logits, cache = smollm2.run_with_cache(clean, names_filter=lambda name: name in names)
        corrupted_logits = smollm2(corrupted)
    mary, john = smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John")
    assert int(clean_logits[0, -1].argmax()) == mary and int(corrupted_logits[0, -1].argmax()) == john
    diff = logit_diff_metric(mary, john)
    clean_value, corrupted_value = float(diff(clean_logits)), float(diff(corrupted_logits))
    # the CLI's grid: layers "n//2:" = 15..29, positions "-5:" = 10..14, normalised
    grid = [(l, p) for l in range(15, 30) for p in range(10, 15)]
    raw = generic_activation_patch(
        smollm2,
        corrupted,
        cache,
        diff,
        layer_pos_patch_setter,
        "resid_pre",
        index_df=pd.DataFrame(grid, columns=["layer", "pos"]),
        progress=False,
    )
    values = (raw - corrupted_value) / (clean_value - corrupted_value)
    top = values.abs().argsort(descending=True)[:3].tolist()

    out = _ok(cli["patch"].result())
    header = re.search(r"clean (-?\d+\.\d{4}), corrupted (-?\d+\.\d{4})", out)
    assert (
        abs(float(header.group(1)) - clean_value) <= 1e-3
        and abs(float(header.group(2)) - corrupted_value) <= 1e-3
    )
    assert "resid_pre: 15 layers x 5 positions = 75 patches" in out
    rows = re.findall(r"^\s+(\d)\s+(\d+)\s+(\d+)\s+(.+?)\s+(-?\d+\.\d{4})$", out, flags=re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    for (_, layer, pos, token, value), i in zip(rows, top):
        assert (int(layer), int(pos)) == grid[i]
        assert abs(float(value) - float(values[i])) <= 1e-3
        clean_tok, corrupted_tok = (
            smollm2.to_str_tokens(clean)[int(pos)],
            smollm2.to_str_tokens(corrupted)[int(pos)],
        )
        assert token == (
            repr(clean_tok) if clean_tok == corrupted_tok else f"{clean_tok!r}/{corrupted_tok!r}"
        )
    # the strongest cell once more, by hand with TransformerLens's own hooks (no minterp_tl code)
    layer, pos = grid[top[0]]
    name = f"blocks.{layer}.hook_resid_pre"

    def put_clean(act, hook):
        act[:, pos] = cache[name][:, pos]
        return act

    with torch.no_grad():
        patched = smollm2.run_with_hooks(corrupted, fwd_hooks=[(name, put_clean)])
    by_hand = (float(diff(patched)) - corrupted_value) / (clean_value - corrupted_value)
    assert abs(float(rows[0][4]) - by_hand) <= 1e-3
    assert by_hand > 0.9  # the name at position 10 carries the answer through the middle layers
    _check_png(cli["out"] / "patch.png", min_size=10_000)


def test_patch_heads_sweeps_match_transformer_lens_setters(smollm2, capsys, tmp_path):
    """``--heads``: a layer x head sweep (every position at once) and a layer x position x head one,
    against the TL-API function with TransformerLens's own patch setters on the same cells."""
    import pandas as pd
    from transformer_lens.patching import layer_head_vector_patch_setter, layer_pos_head_vector_patch_setter

    from minterp_tl.patching import generic_activation_patch, logit_diff_metric

    clean, corrupted = smollm2.to_tokens(IOI_CLEAN), smollm2.to_tokens(IOI_CORRUPTED)
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(clean, names_filter=lambda name: name == "blocks.29.attn.hook_z")
        diff = logit_diff_metric(smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John"))
        corrupted_value = float(diff(smollm2(corrupted)))
    for extra, setter, rows, columns in (
        ([], layer_head_vector_patch_setter, [(29, h) for h in range(9)], ["layer", "head"]),
        (
            ["--positions", "-1"],
            layer_pos_head_vector_patch_setter,
            [(29, 14, h) for h in (0, 4)],
            ["layer", "pos", "head"],
        ),
    ):
        png = tmp_path / f"heads{len(extra)}.png"
        heads = "0, 4" if extra else "all"
        assert (
            main(
                [
                    "patch",
                    "--hook",
                    "z",
                    "--layers",
                    "-1",
                    "--heads",
                    heads,
                    *extra,
                    "--top-k",
                    "2",
                    "--no-progress",
                    "--out",
                    str(png),
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        expected = generic_activation_patch(
            smollm2,
            corrupted,
            cache,
            diff,
            setter,
            "z",
            index_df=pd.DataFrame(rows, columns=columns),
            progress=False,
        )
        top = (expected - corrupted_value).abs().argsort(descending=True)[:2].tolist()  # the largest effects
        printed = re.findall(r"^\s+[12]\s+(29)\s+(?:(14)\s+' to'\s+)?(\d)\s+(-?\d+\.\d{4})$", out, flags=re.M)
        assert len(printed) == 2, out
        for (layer, pos, head, value), i in zip(printed, top):
            assert (int(layer), *([int(pos)] if pos else []), int(head)) == rows[i]
            assert abs(float(value) - float(expected[i])) <= 1e-3
        _check_png(png)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["patch", IOI_CLEAN, "When Mary and John went to the store, Mary gave a big drink to"],
            "the clean prompt has 15, the corrupted one 16",
        ),
        (["patch", "--answer", " Mary Jane"], "--answer ' Mary Jane' is 2 tokens"),
        (["patch", "--hook", "resid_prex"], "--hook: Unknown hook name 'resid_prex' at layer 0"),
        (["patch", "--positions", "20"], "--positions: position spec '20': position 20 is out of range"),
        (["patch", "--layers", "-31"], "--layers: layer spec '-31': layer -31 is out of range"),
        (["patch", "--heads", "0"], "--heads '0' given, but blocks.0.hook_resid_pre has no head axis"),
        (["patch", "--hook", "z", "--heads", "9"], "--heads: head spec '9': head 9 is out of range"),
        (["patch", "--positions", " Paris"], "--positions: position spec ' Paris'"),
        (["patch", "--answer", " Mary", "--wrong", " Mary"], "--answer and --wrong are the same token"),
    ],
)
def test_patch_bad_input_after_loading_exits_2_with_one_line(args, message, smollm2, capsys, tmp_path):
    png = tmp_path / "patch.png"
    assert main([*args, "--no-progress", "--out", str(png)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_error_line(captured.err, message)
    assert not png.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["patch", "--positions", "1:2:0"], "--positions: position spec '1:2:0'"),
        (["patch", "--heads", "n//0"], "--heads: head spec 'n//0'"),
        (["patch", IOI_CLEAN, ""], "the corrupted prompt is empty"),
        (["patch", "--top-k", "0"], "--top-k must be in 1..1000"),
        (["patch", "--top-k", "1000000000"], "--top-k must be in 1..1000"),
        (["patch", "--out", "/tmp"], "must be a .png path"),
        (["patch", "--out", "/"], "must be a .png path"),
        (["patch", "--out", "/no/such/dir/p.png"], "--out must be a .png path in an existing directory"),
        (["patch", "--top-k", "three"], "argument --top-k: invalid int value: 'three'"),
        (["patch", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_patch_bad_input_before_loading_exits_2_with_one_line(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_error_line(captured.err, message)


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_as_a_subprocess_exits_2_with_one_line(name, cli):
    result = cli[f"bad: {name}"].result()
    assert result.returncode == 2
    assert result.stdout == ""
    _one_error_line(result.stderr, BAD_INPUT[name][1])


# --------------------------------------------------------------------------------------------
# routes, lens, info
# --------------------------------------------------------------------------------------------


def test_routes_prints_paths_and_writes_png_and_json(cli, smollm2):
    from minterp_tl.routes import build_graph, load_json, strongest_paths
    from minterp_tl.transparent import TransformerLensTransparentLlm

    llm = TransformerLensTransparentLlm(smollm2)
    llm.run([PROMPT])
    graph = build_graph(llm, 0, progress=False, distance_norm=2)  # the command ran with --distance-norm 2
    expected = [r.describe(graph.graph["tokens"]) for r in strongest_paths(graph, token=-1, k=3)]

    out = _ok(cli["routes"].result())
    assert "predicts ' Paris'" in out
    printed = [line.strip() for line in out.splitlines() if line.startswith("  ") and "-> I29_5" in line]
    assert len(printed) == 3
    for line, ref in zip(printed, expected):
        _same_fields(line, ref, tol=1e-3)
    assert set(load_json(cli["out"] / "routes.json").edges) == set(graph.edges)
    _check_png(cli["out"] / "routes.png", min_size=10_000)


@pytest.mark.parametrize(
    "args, message",
    [
        (["routes", "  "], "the prompt is empty"),
        (["routes", "hi", "--threshold", "1.5"], "--threshold must be in [0, 1)"),
        (["routes", "hi", "--out", "routes.txt"], "--out must be a .png path"),
    ],
)
def test_routes_bad_input_exits_2_with_one_line(args, message, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_error_line(captured.err, message)


def test_lens_prints_the_table_of_the_lens_and_writes_the_png(cli, smollm2):
    from minterp_tl.lens import logit_lens

    lens = logit_lens(smollm2, PROMPT)
    expected = lens.table(position=-1, k=3, answer=int(lens.logits[-1, 0, -1].argmax())).splitlines()

    out = _ok(cli["lens"].result())
    printed = out.split("\n\nheatmap written to")[0].splitlines()
    assert len(printed) == len(expected) == 2 + 31 and printed[:2] == expected[:2]
    for line, ref in zip(printed[2:], expected[2:]):
        _same_fields(line, ref, tol=2e-3)
    assert printed[-1].split()[:3] == ["L29", "'", "Paris'"] and printed[-1].split()[-1] == "0"
    _check_png(cli["out"] / "lens.png", min_size=10_000)


def test_info_prints_model_info_and_the_next_tokens_and_writes_the_png(cli, smollm2):
    with torch.no_grad():
        probs = smollm2(PROMPT)[0, -1].softmax(-1)
    top = probs.topk(5)

    out = _ok(cli["info"].result())
    lines = out.splitlines()
    assert lines[0].split() == ["model", "smollm2-135m"]
    assert any(line.split() == ["layers", "30"] for line in lines)
    assert any(line.split() == ["heads", "9"] for line in lines)
    assert any(line.split() == ["d_vocab", "49152"] for line in lines)
    ranked = re.findall(r"^\s+(\d)\s+('.*?'|\".*?\")\s+(\d\.\d{4})$", out, flags=re.M)
    assert [int(r[0]) for r in ranked] == [1, 2, 3, 4, 5]
    for (_, token, p), ref_p, ref_id in zip(ranked, top.values.tolist(), top.indices.tolist()):
        assert token == repr(smollm2.tokenizer.decode([ref_id]))
        assert abs(float(p) - ref_p) <= 1e-4
    assert ranked[0][1] == "' Paris'"
    _check_png(cli["out"] / "info.png")


# --------------------------------------------------------------------------------------------
# help
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "lens", "patch", "routes", "circuit"])
def test_every_subcommand_has_help_and_the_common_options(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    top = capsys.readouterr().out
    assert re.search(rf"^\s+{command}\s+\S", top, flags=re.M)  # listed with a one-line summary
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: minterp-tl {command}")
    for option in ("--model", "--out", "--no-progress"):
        assert option in text
    assert len(text.split("options:")[0]) > 300  # a description, not just usage


def test_import_and_help_load_nothing_heavy():
    """``import minterp_tl`` and ``minterp-tl --help`` import neither torch nor TransformerLens, matplotlib
    or networkx (names are imported on first use), so the help answers at once."""
    code = (
        "import sys\n"
        "import minterp_tl\n"
        "from minterp_tl.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'transformer_lens', 'matplotlib', 'networkx') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
        "from minterp_tl import Edits, patching\n"
        "print('LAZY', Edits.__module__, patching.__name__, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    assert "HEAVY []" in out.stdout and "LAZY minterp_tl.edits minterp_tl.patching True" in out.stdout


# --------------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------------


def test_serve_listens_on_localhost_and_answers(hf_model):
    import json
    import subprocess
    import sys
    import urllib.request

    folder = hf_model.folder("gpt2")
    command = [sys.executable, "-c", "from minterp_tl.cli import run; run()", "serve", "--model", folder]
    proc = subprocess.Popen(command + ["--port", "0", "--no-progress"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "minterp_tl explorer on http://127.0.0.1:" in line, line
        url = line.split()[3]
        request = urllib.request.Request(
            url + "api/run", data=json.dumps({"prompt": "The capital of France is"}).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["n_layers"] == 2
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b"minterp_tl explorer" in response.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_bad_port_exits_2(capsys):
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err
