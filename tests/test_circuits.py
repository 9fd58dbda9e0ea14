"""Tests for minterp_tl.circuits: configs, mask formulas, ablation modes, and circuits on the induction model.

References: the model's own logits (masks off, or a second copy of the model with the masked weights
written into it), TransformerLens's own hooks (zeroing ``hook_z`` per head), Monte-Carlo estimates
of the hard-concrete formulas, and an exhaustive search over every subset of heads of the trained
induction model.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from minterp_tl.circuits import (
    HC_BETA,
    HC_GAMMA,
    HC_ZETA,
    CircuitConfig,
    CircuitModel,
    find_subnetwork,
)
from minterp_tl.models import induction_report, repeated_random_tokens, second_half_loss, toy_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and on the shared 2-core machine a second thread
    made training about 10x slower (contention), not faster. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CS = dict(ablation="none", mask_unit="weight", mask_bias=False, mask_init_value=1.0)
HC = dict(ablation="none", mask_unit="weight", mask_bias=False, mask_init_percentage=0.7)
MP = dict(ablation="none", mask_bias=False, prune_percentage=0.3)


def _tokens(d_vocab: int = 50, batch: int = 2, pos: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _randomise_logits(circuit: CircuitModel, seed: int = 0) -> None:
    """Mask logits from N(0, 1): about half the units kept, so a masked run differs from the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in circuit.mask_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def _linear_of(model, name: str) -> torch.nn.Linear:
    """The nn.Linear behind a canonical weight name, found independently of circuits.py."""
    _, layer, kind, weight = name.split(".")
    path = {"W_Q": "q", "W_K": "k", "W_V": "v", "W_O": "o", "W_in": "in", "W_gate": "gate", "W_out": "out"}[
        weight
    ]
    return model.blocks[int(layer)].get_submodule(f"{kind}.{path}").original_component


# --------------------------------------------------------------------------------------------
# CircuitConfig: validation and targets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (
            dict(mask_method="contsparse", mask_hparams=CS),
            ["unknown mask_method", "continuous_sparsification"],
        ),
        (
            dict(mask_hparams={k: v for k, v in CS.items() if k != "mask_init_value"}),
            ["missing", "mask_init_value"],
        ),
        (dict(mask_method="hard_concrete", mask_hparams=CS), ["missing", "mask_init_percentage"]),
        (
            dict(mask_method="magnitude_pruning", mask_hparams={**MP, "mask_init_value": 1.0}),
            ["mask_init_value", "valid keys"],
        ),
        (dict(mask_hparams={**CS, "ablation": "zero"}), ["unknown ablation", "zero_ablate"]),
        (dict(mask_hparams={**CS, "mask_unit": "heads"}), ["unknown mask_unit", "head"]),
        (dict(mask_hparams={**CS, "mask_init_value": float("nan")}), ["mask_init_value", "finite"]),
        (
            dict(mask_method="hard_concrete", mask_hparams={**HC, "mask_init_percentage": 1.0}),
            ["strictly between 0 and 1"],
        ),
        (
            dict(mask_method="magnitude_pruning", mask_hparams={**MP, "prune_percentage": 1.5}),
            ["prune_percentage", "[0, 1]"],
        ),
        (dict(mask_hparams=CS, l0_lambda=-1.0), ["l0_lambda", ">= 0"]),
        (dict(mask_hparams=CS, target_layers=("attn.W_X",)), ["unknown weight", "W_Q"]),
        (dict(mask_hparams=CS, target_layers=("attn[n//2 +]",)), ["layer spec"]),
        (dict(mask_hparams=CS, target_layers=()), ["non-empty"]),
        (dict(mask_hparams=CS, target_layers=("blocks.1.attn[0]",)), ["layer once"]),
    ],
)
def test_config_errors_name_the_input_and_what_is_valid(kwargs, words):
    kwargs.setdefault("target_layers", ("attn",))
    with pytest.raises(ValueError) as err:
        CircuitConfig(**kwargs)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_config_is_frozen_and_round_trips_through_json():
    cfg = CircuitConfig(
        "hard_concrete", HC, ("blocks.1.attn.W_O", "mlp[n//2:]", ("attn.W_Q", [0, -1])), l0_lambda=0.01
    )
    with pytest.raises(Exception):
        cfg.l0_lambda = 1.0  # type: ignore[misc]
    again = CircuitConfig.from_json(cfg.to_json())
    assert again.to_json() == cfg.to_json()
    assert again.mask_hparams == cfg.mask_hparams and again.l0_lambda == 0.01


def test_targets_resolve_to_canonical_weights(toys):
    cases = {
        ("attn[n//2:]",): [f"blocks.{l}.attn.{w}" for l in (2, 3) for w in ("W_Q", "W_K", "W_V", "W_O")],
        (("mlp", "last"),): ["blocks.3.mlp.W_in", "blocks.3.mlp.W_gate", "blocks.3.mlp.W_out"],
        ("blocks.-1.attn.W_O", "W_in[0]"): ["blocks.0.mlp.W_in", "blocks.3.attn.W_O"],
    }
    for targets, expected in cases.items():
        with CircuitModel(CircuitConfig(mask_hparams=CS, target_layers=targets), toys["gqa"]) as circuit:
            assert circuit.names == expected
    # A group skips weights the architecture lacks; a named weight it lacks is an error.
    with CircuitModel(CircuitConfig(mask_hparams=CS, target_layers=("mlp[0]",)), toys["ln"]) as circuit:
        assert circuit.names == ["blocks.0.mlp.W_in", "blocks.0.mlp.W_out"]
    with pytest.raises(ValueError, match="has no mlp.W_gate"):
        CircuitModel(CircuitConfig(mask_hparams=CS, target_layers=("W_gate",)), toys["ln"])
    with pytest.raises(ValueError, match="select no weight"):
        CircuitModel(CircuitConfig(mask_hparams=CS, target_layers=("mlp",)), toys["attn_only"])
    with pytest.raises(ValueError, match="out of range"):
        CircuitModel(CircuitConfig(mask_hparams=CS, target_layers=("attn[7]",)), toys["ln"])
    with pytest.raises(ValueError, match="attention weights"):
        CircuitModel(
            CircuitConfig(mask_hparams={**CS, "mask_unit": "head"}, target_layers=("mlp",)), toys["ln"]
        )
    # Nothing stays attached after the failures: the model is untouched.
    x = _tokens()
    assert torch.equal(toys["ln"](x), toy_model("ln")(x))


# --------------------------------------------------------------------------------------------
# The masked forward against independent references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["weight", "neuron", "head"])
def test_masked_forward_equals_a_model_with_the_masked_weights_written_in(toy, unit):
    """Eval masks (random 0/1) give the logits of a fresh copy whose weights were multiplied by them."""
    kind = toy._minterp_name.removeprefix("toy-")
    targets = ("all",) if unit != "head" else ("attn",)
    cfg = CircuitConfig(mask_hparams={**CS, "mask_unit": unit, "mask_bias": True}, target_layers=targets)
    x = _tokens()
    reference = toy_model(kind)
    with CircuitModel(cfg, toy) as circuit:
        _randomise_logits(circuit, seed=1)
        circuit.eval()
        got = circuit(x)
        hard = circuit.hard_masks()
    with torch.no_grad():
        for name in [n for n in hard if not n.endswith(".bias")]:
            linear = _linear_of(reference, name)
            m = hard[name].float()
            rows = not name.endswith(("W_O", "W_out"))
            if unit != "weight":
                group = linear.weight.shape[0 if rows else 1] // m.numel()
                m = m.repeat_interleave(group)
                linear.weight.mul_(m[:, None] if rows else m[None, :])
                if linear.bias is not None and rows:
                    linear.bias.mul_(m)
            else:
                linear.weight.mul_(m)
                if linear.bias is not None:
                    linear.bias.mul_(hard[f"{name}.bias"].float())
    expected = reference(x)
    assert not torch.allclose(got, toy(x), atol=1e-3)  # the masks do something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", ["gqa", "induction"])
def test_head_mask_on_W_O_equals_zeroing_hook_z(toys, induction_model, fixture):
    model = toys["gqa"] if fixture == "gqa" else induction_model
    x = _tokens(d_vocab=50 if fixture == "gqa" else 64, batch=3, pos=12)
    cfg = CircuitConfig(mask_hparams={**CS, "mask_unit": "head"}, target_layers=("attn.W_O",))
    with CircuitModel(cfg, model) as circuit:
        _randomise_logits(circuit, seed=3)
        circuit.eval()
        got = circuit(x)
        keep = circuit.hard_masks()

    def zero_heads(z, hook):
        m = keep[f"blocks.{hook.name.split('.')[1]}.attn.W_O"].to(z.dtype)
        return z * m[None, None, :, None]

    expected = model.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), zero_heads)])
    assert not all(bool(k.all()) for k in keep.values())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_use_masks_false_restores_exact_logits_and_name_list_is_per_weight(toys):
    x = _tokens()
    for kind, model in toys.items():
        ref = model(x)
        cfg = CircuitConfig(mask_hparams=CS, target_layers=("all",))
        with CircuitModel(cfg, model) as circuit:
            _randomise_logits(circuit)
            for training in (True, False):
                circuit.train(training)
                assert not torch.allclose(circuit(x), ref, atol=1e-3)
                circuit.use_masks(False)
                assert torch.equal(circuit(x), ref), kind
                circuit.use_masks(True)
            circuit.eval()
            masked = circuit(x)
            # Switching off all but one weight equals a circuit that masks only that weight.
            only = circuit.names[0]
            circuit.use_masks(False, [n for n in circuit.names if n != only])
            partial = circuit(x)
            state = {k: v for k, v in circuit.mask_state().items() if k.startswith(only + ".")}
        single_cfg = CircuitConfig(mask_hparams=CS, target_layers=(only,))
        with CircuitModel(single_cfg, model) as single:
            with torch.no_grad():
                single.mask_parameters()[0].copy_(state[f"{only}.weight_logits"])
            single.eval()
            assert torch.equal(single(x), partial)
        assert not torch.equal(masked, partial)
        assert torch.equal(model(x), ref)  # detached: the model's own forward again
    with pytest.raises(ValueError, match="not a masked weight"):
        with CircuitModel(CircuitConfig(mask_hparams=CS, target_layers=("W_Q",)), toys["ln"]) as circuit:
            circuit.use_masks(False, ["blocks.0.attn.W_K"])


def test_smollm2_masks_gqa_heads_and_restores_exact_logits(smollm2):
    x = smollm2.to_tokens("The capital of France is")
    ref = smollm2(x)
    cfg = CircuitConfig(mask_hparams={**CS, "mask_unit": "head"}, target_layers=("attn[-2:]",))
    with CircuitModel(cfg, smollm2) as circuit:
        stats = circuit.compute_l0_statistics()
        # 9 query heads, 3 key/value heads (W_K, W_V) per layer.
        assert stats["layer2maxl0"]["blocks.29.attn.W_Q"] == 9
        assert (
            stats["layer2maxl0"]["blocks.29.attn.W_K"] == 3
            and stats["layer2maxl0"]["blocks.29.attn.W_V"] == 3
        )
        assert stats["max_l0"] == 2 * (9 + 3 + 3 + 9)
        circuit.eval()
        assert torch.equal(circuit(x), ref)  # every mask logit 1.0 > 0: all kept, bit for bit
        with torch.no_grad():
            circuit.mask_parameters()[3][4] = -1.0  # blocks.28.attn.W_O, head 4
        assert circuit.hard_masks()["blocks.28.attn.W_O"].tolist() == [True] * 4 + [False] + [True] * 4
        masked = circuit(x)
        circuit.use_masks(False)
        assert torch.equal(circuit(x), ref)

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 4] = 0
        return z

    expected = smollm2.run_with_hooks(x, fwd_hooks=[("blocks.28.attn.hook_z", zero_head)])
    torch.testing.assert_close(masked, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(smollm2(x), ref)


# --------------------------------------------------------------------------------------------
# Formulas of the design notes (4.3)
# --------------------------------------------------------------------------------------------


def test_continuous_sparsification_l0_and_masks(toys):
    model = toys["ln"]
    with CircuitModel(
        CircuitConfig(mask_hparams={**CS, "mask_init_value": 0.3}, target_layers=("attn[0]",)), model
    ) as c:
        c.train()
        stats = c.compute_l0_statistics()
        n = stats["max_l0"]
        assert n == 4 * 32 * 32
        assert stats["total_l0"] == pytest.approx(n * (1 / (1 + math.exp(-0.3))), rel=1e-6)
        c.temperature = 3.0
        assert c.compute_l0_statistics()["total_l0"] == pytest.approx(n / (1 + math.exp(-0.9)), rel=1e-6)
        _randomise_logits(c)
        logits = torch.cat([p.flatten() for p in c.mask_parameters()])
        masks = c.current_masks()
        s = c.mask_parameters()[0].detach()
        torch.testing.assert_close(masks["blocks.0.attn.W_Q"], torch.sigmoid(3.0 * s))
        c.eval()
        assert c.compute_l0_statistics()["total_l0"] == int((logits > 0).sum())
        assert torch.equal(c.current_masks()["blocks.0.attn.W_Q"], (s > 0).float())
        layer2 = c.compute_l0_statistics()["layer2l0"]
        assert sum(layer2.values()) == int((logits > 0).sum())
        with pytest.raises(ValueError, match="> 0"):
            c.temperature = 0.0


def test_hard_concrete_init_expected_l0_and_samples(toys):
    p = 0.7
    cfg = CircuitConfig("hard_concrete", {**HC, "mask_init_percentage": p}, ("blocks.0.attn.W_Q",))
    with CircuitModel(cfg, toys["ln"]) as c:
        s = c.mask_parameters()[0]
        assert torch.allclose(s, torch.full_like(s, math.log(p / (1 - p))))
        with torch.no_grad():
            s.copy_(torch.linspace(-3, 3, s.numel()).view(s.shape))
        c.train()
        expected = torch.sigmoid(s.detach() - HC_BETA * math.log(-HC_GAMMA / HC_ZETA)).sum()
        assert c.compute_l0_statistics()["total_l0"] == pytest.approx(float(expected), rel=1e-5)
        # Monte Carlo: the training L0 is the expected number of non-zero mask entries.
        torch.manual_seed(0)
        samples = torch.stack([c.current_masks()["blocks.0.attn.W_Q"] for _ in range(400)])
        assert float(samples.min()) == 0.0 and float(samples.max()) == 1.0  # stretched and clamped
        nonzero = (samples > 0).float().sum(dim=(1, 2))
        assert float(nonzero.mean()) == pytest.approx(float(expected), rel=0.01)
        # Eval: clamp(sigmoid(s) * (zeta - gamma) + gamma, 0, 1) > 0.5.
        c.eval()
        eval_mask = (torch.sigmoid(s) * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0, 1) > 0.5
        assert torch.equal(c.current_masks()["blocks.0.attn.W_Q"], eval_mask.float())
        assert c.compute_l0_statistics()["total_l0"] == int(eval_mask.sum())
        with pytest.raises(ValueError, match="continuous_sparsification"):
            c.temperature = 2.0


@pytest.mark.parametrize("unit", ["weight", "head"])
def test_magnitude_pruning_keeps_exactly_the_largest(toys, unit):
    model = toys["gqa"]
    cfg = CircuitConfig("magnitude_pruning", {**MP, "prune_percentage": 0.3, "mask_unit": unit}, ("attn[1]",))
    with CircuitModel(cfg, model) as c:
        assert c.mask_parameters() == []
        masks = c.hard_masks()
        for name, mask in masks.items():
            w = _linear_of(model, name).weight.detach()
            if unit == "weight":
                scores = w.abs()
            else:  # L2 norm of each head's rows (W_Q/K/V) or columns (W_O)
                rows = not name.endswith("W_O")
                per = (w if rows else w.T).reshape(mask.numel(), -1)
                scores = per.norm(dim=1)
            assert int(mask.sum()) == round(mask.numel() * 0.7), name
            assert float(scores[mask].min()) >= float(scores[~mask].max()), name
        for training in (True, False):
            c.train(training)
            assert c.compute_l0_statistics()["total_l0"] == sum(int(m.sum()) for m in masks.values())


# --------------------------------------------------------------------------------------------
# Ablation modes
# --------------------------------------------------------------------------------------------


def test_ablation_modes_masks(toys):
    cfg = CircuitConfig(mask_hparams={**CS, "mask_unit": "neuron"}, target_layers=("mlp",))
    model = toys["ln"]
    x = _tokens()
    with CircuitModel(cfg, model) as c:
        c.eval()
        with torch.no_grad():  # each layer keeps 40 of its 128 neurons
            for p in c.mask_parameters():
                p.copy_(torch.where(torch.randperm(p.numel()) < 40, 1.0, -1.0))
        hard = {k: v.float() for k, v in c.hard_masks().items()}
        subnetwork = c(x)

        c.set_ablate_mode("zero_ablate")
        assert all(torch.equal(c.current_masks()[k], 1 - hard[k]) for k in hard)
        removed = c(x)
        assert c.compute_l0_statistics()["total_l0"] == sum(
            float(h.sum()) for h in hard.values()
        )  # L0 of the found mask

        c.set_ablate_mode("randomly_sampled", seed=0)
        first = c.current_masks()
        assert all(float(first[k].sum()) == float(hard[k].sum()) for k in hard)
        c.set_ablate_mode("randomly_sampled")
        assert all(torch.equal(c.current_masks()[k], first[k]) for k in hard)  # reused
        c.set_ablate_mode("randomly_sampled", force_resample=True)
        second = c.current_masks()
        assert any(not torch.equal(second[k], first[k]) for k in hard)
        assert all(float(second[k].sum()) == float(hard[k].sum()) for k in hard)
        c.set_ablate_mode("randomly_sampled", remove=True)
        assert all(torch.equal(c.current_masks()[k], 1 - second[k]) for k in hard)

        for seed in range(3):
            c.set_ablate_mode("complement_sampled", force_resample=True, seed=seed)
            comp = c.current_masks()
            for k in hard:
                assert float(comp[k].sum()) == float(hard[k].sum())
                assert float((comp[k] * hard[k]).sum()) == 0.0  # disjoint from the subnetwork

        c.set_ablate_mode("random_ablate", seed=0)
        random_removed = c(x)
        # Reference: the subnetwork's (removed) neurons' rows of W_in / columns of W_out get the stored
        # re-initialised values, in a fresh copy of the model; every other weight stays.
        reference = toy_model("ln")
        with torch.no_grad():
            for name in hard:
                layer = c.mask_layers[name.replace(".", "/")]
                linear = _linear_of(reference, name)
                gone = hard[name] == 1
                if name.endswith("W_in"):
                    linear.weight[gone] = layer._random["weight"][gone]
                else:
                    linear.weight[:, gone] = layer._random["weight"][:, gone]
        torch.testing.assert_close(random_removed, reference(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(random_removed, removed, atol=1e-3)
        assert not torch.allclose(subnetwork, removed, atol=1e-3)

        with torch.no_grad():  # keep 100 of 128: no disjoint sample of the same size exists
            c.mask_parameters()[0].copy_(torch.where(torch.arange(128) < 100, 1.0, -1.0))
        with pytest.raises(ValueError, match="complement"):
            c.set_ablate_mode("complement_sampled")
        with pytest.raises(ValueError, match="unknown ablation"):
            c.set_ablate_mode("zero")


# --------------------------------------------------------------------------------------------
# Training: frozen base, L0 in the loss, save / load
# --------------------------------------------------------------------------------------------


def test_frozen_base_gets_no_gradient_and_l0_is_added_to_the_loss(toys):
    model = toys["gqa"]
    x = _tokens(pos=7)
    lam = 0.25
    modules = [*model.modules(), *model.original_model.modules()]
    assert not any(m.training for m in modules)
    with CircuitModel(CircuitConfig(mask_hparams=CS, target_layers=("all[1:3]",), l0_lambda=lam), model) as c:
        c.train(True)
        assert all(not p.requires_grad for p in model.parameters())
        loss = c(x, return_type="loss")
        logits = c(x)
        plain = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        torch.testing.assert_close(loss, plain + lam * c.l0(), rtol=1e-5, atol=1e-5)
        logits2, loss2 = c(x, return_type="both")
        torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-6)
        loss.backward()
        assert all(p.grad is None for p in model.parameters())
        grads = [p.grad for p in c.mask_parameters()]
        assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
        c.eval()
        c.train()
        assert all(not p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored on detach
    assert not any(m.training for m in modules)  # so is eval mode (TL's patching requires it)

    unfrozen = CircuitConfig(mask_hparams=CS, target_layers=("W_in[0]",), freeze_base=False, add_l0=False)
    with CircuitModel(unfrozen, model) as c:
        c.train()
        loss = c(x, return_type="loss")
        loss.backward()
        w_in = _linear_of(model, "blocks.0.mlp.W_in").weight
        assert w_in.grad is not None and float(w_in.grad.abs().sum()) > 0
        torch.testing.assert_close(loss, c.model(x, return_type="loss"))  # no L0 added
    for p in model.parameters():
        p.grad = None


def test_masks_save_and_load(toys, tmp_path):
    model = toys["attn_only"]
    x = _tokens()
    cfg = CircuitConfig("hard_concrete", {**HC, "mask_bias": True}, ("attn[::2]",))
    path = tmp_path / "masks"
    with CircuitModel(cfg, model) as c:
        _randomise_logits(c, seed=7)
        c.eval()
        expected = c(x)
        state = c.mask_state()
        assert any(k.endswith("bias_logits") for k in state)
        report = c.write_masks(path)
        assert sorted(report.written) == sorted(state)
        assert c.write_masks(path).written == []  # unchanged masks are not rewritten
    with CircuitModel.read(path, model) as again:
        again.eval()
        assert again.config == cfg
        assert all(torch.equal(again.mask_state()[k], v) for k, v in state.items())
        assert torch.equal(again(x), expected)
    other = CircuitConfig("hard_concrete", {**HC, "mask_bias": True}, ("attn[1]",))
    with CircuitModel(other, model) as c:
        with pytest.raises(ValueError, match="do not match"):
            c.read_masks(path)
    with pytest.raises(ValueError, match="no saved masks"):
        CircuitModel.read(tmp_path / "missing", model)


def test_one_circuit_per_model_and_bad_arguments(toys):
    model = toys["ln"]
    cfg = CircuitConfig(mask_hparams=CS, target_layers=("W_Q",))
    with CircuitModel(cfg, model):
        with pytest.raises(ValueError, match="already masked"):
            CircuitModel(cfg, model)
    with pytest.raises(ValueError, match="TransformerBridge"):
        CircuitModel(cfg, torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nothing to train"):
        find_subnetwork(
            model, CircuitConfig("magnitude_pruning", MP, ("W_Q",)), [_tokens()], lambda l, b: l.sum()
        )


# --------------------------------------------------------------------------------------------
# The trained induction model: keep the task, and break it
# --------------------------------------------------------------------------------------------

INDUCTION_HEADS_MIN_SCORE = 0.3


@pytest.fixture(scope="module")
def induction_circuits(induction_model, tmp_path_factory):
    """Train a keep mask and a break mask (head units on W_O), measure them, detach."""
    model = induction_model
    gen = torch.Generator().manual_seed(1)
    train = [repeated_random_tokens(48, L, 64, gen) for L in (8, 10, 12, 14, 17, 19, 22, 24)]
    test = repeated_random_tokens(128, 11, 64, torch.Generator().manual_seed(5))  # held-out length
    out: dict = {"test": test}
    with torch.no_grad():
        out["full"] = float(second_half_loss(model(test), test))
    for variant, ablation, init, lam, maximize in (
        ("keep", "none", 2.0, 0.05, False),
        ("break", "zero_ablate", -2.0, 0.5, True),
    ):
        hp = dict(ablation=ablation, mask_unit="head", mask_bias=False, mask_init_value=init)
        cfg = CircuitConfig("continuous_sparsification", hp, ("attn.W_O",), l0_lambda=lam)
        circuit, history = find_subnetwork(
            model, cfg, train, second_half_loss, steps=80, epochs=8, lr=0.1, maximize=maximize, progress=False
        )
        with torch.no_grad():
            r: dict = {"heads": circuit.kept_heads(), "history": history}
            r["loss"] = float(second_half_loss(circuit(test), test))  # under the config's ablation
            if variant == "keep":
                circuit.set_ablate_mode("zero_ablate")
                r["zero_ablate"] = float(second_half_loss(circuit(test), test))
            for mode in ("randomly_sampled", "complement_sampled"):
                losses = []
                for i in range(8):
                    try:
                        circuit.set_ablate_mode(mode, force_resample=True, seed=i, remove=variant == "break")
                    except ValueError:
                        break
                    losses.append(float(second_half_loss(circuit(test), test)))
                r[mode] = losses
            r["temperature"] = circuit.temperature
            plots = tmp_path_factory.mktemp("plots")
            r["pngs"] = [
                circuit.plot_masks(plots / f"{variant}_masks.png"),
                history.plot(plots / f"{variant}_history.png"),
            ]
        circuit.detach()
        out[variant] = r
    return out


def _subset_losses(model, test, sizes, chunk: int = 16) -> dict[tuple, float]:
    """Loss of every subset of heads of the given sizes, other heads zeroed at hook_z (TL's own hooks).

    ``chunk`` subsets run in one forward pass: the batch is repeated and each copy gets its own mask.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    subsets = [keep for k in sizes for keep in itertools.combinations(heads, k)]
    b = test.shape[0]
    result = {}
    with torch.no_grad():
        for start in range(0, len(subsets), chunk):
            part = subsets[start : start + chunk]
            mask = torch.zeros(len(part), n_layers, n_heads)
            for i, keep in enumerate(part):
                for l, h in keep:
                    mask[i, l, h] = 1.0
            mask = mask.repeat_interleave(b, dim=0)  # [subsets * batch, layer, head]

            def hook(z, hook, mask=mask):
                return z * mask[:, int(hook.name.split(".")[1])][:, None, :, None]

            tokens = test.repeat(len(part), 1)
            logits = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), hook)])
            for i, keep in enumerate(part):
                result[keep] = float(second_half_loss(logits[i * b : (i + 1) * b], test))
    return result


def test_induction_subnetwork_keeps_the_task(induction_model, induction_circuits):
    r, full, test = induction_circuits["keep"], induction_circuits["full"], induction_circuits["test"]
    report = induction_report(induction_model, 11)
    n_heads = induction_model.cfg.n_layers * induction_model.cfg.n_heads
    heads = r["heads"]
    # The subnetwork keeps the induction loss within 10% of the full model with fewer heads.
    assert r["loss"] <= 1.10 * full
    assert len(heads) < n_heads
    # It contains the previous-token head and induction heads (by their scores).
    assert report.best_prev_token_head() in heads
    assert any(float(report.induction_scores[l, h]) > INDUCTION_HEADS_MIN_SCORE for l, h in heads)
    # Among all subsets of the same size (exhaustive, zeroing hook_z), it is the best one.
    same_size = _subset_losses(induction_model, test, [len(heads)])
    assert r["loss"] == pytest.approx(min(same_size.values()), rel=1e-4)
    # Running only a random set of heads of the same size is far worse (mean of 8 samples).
    assert len(r["randomly_sampled"]) == 8
    assert sum(r["randomly_sampled"]) / 8 > 3 * r["loss"]
    # Zero-ablating the subnetwork leaves the model at chance (ln 64) on the second half.
    assert r["zero_ablate"] > 0.9 * math.log(64)
    # The continuous-sparsification schedule ended at the final temperature.
    assert r["temperature"] == pytest.approx(200.0, rel=1e-6)
    assert r["history"].temperature[0] == 1.0 and len(r["history"].task_loss) == 80
    assert r["history"].final_l0 == len(heads)
    for png in r["pngs"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_find_subnetwork_argument_errors(toys):
    cfg = CircuitConfig(mask_hparams=CS, target_layers=("W_Q",))
    model = toys["ln"]
    for kwargs, word in (
        (dict(steps=0), "steps"),
        (dict(steps=4, epochs=5), "epochs"),
        (dict(lr=0), "lr"),
        (dict(final_temperature=0.5), "final_temperature"),
    ):
        with pytest.raises(ValueError, match=word):
            find_subnetwork(
                model, cfg, [_tokens()], lambda logits, b: logits.mean(), progress=False, **kwargs
            )
    with pytest.raises(ValueError, match="batches"):
        find_subnetwork(model, cfg, [], lambda logits, b: logits.mean(), progress=False)
    x = _tokens()
    with pytest.raises(ZeroDivisionError):
        find_subnetwork(model, cfg, [x], lambda logits, b: 1 / 0, progress=False)
    assert torch.equal(model(x), toy_model("ln")(x))  # every failed call left the model unmasked


def test_induction_no_half_size_subnetwork_exists_on_this_model(induction_model, induction_circuits):
    """The issue's target (<= half the heads within 10%) is unreachable here: the four layer-1 heads
    split the copying between them. Exhaustive search over every subset of <= 4 of the 8 heads."""
    full, test = induction_circuits["full"], induction_circuits["test"]
    small = _subset_losses(induction_model, test, range(0, 5))
    best = min(small.values())
    assert best > 1.10 * full
    assert best > 4 * full


def test_induction_removal_that_breaks_the_task(induction_model, induction_circuits):
    r = induction_circuits["break"]
    report = induction_report(induction_model, 11)
    removed = r["heads"]  # units the break mask selects: removed under zero_ablate
    assert 1 <= len(removed) <= 2
    assert report.best_prev_token_head() in removed
    # Removing them breaks the task: near chance (ln 64 = 4.16) from 0.23.
    assert r["loss"] > 0.85 * math.log(64)
    # Removing a random set of the same size (NeuroSurgeon's control) does far less on average.
    for mode in ("randomly_sampled", "complement_sampled"):
        losses = r[mode]
        assert len(losses) == 8
        assert sum(losses) / len(losses) < 0.5 * r["loss"], mode


# --------------------------------------------------------------------------------------------
# A redundant induction model (head dropout in training): the original target
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redundant_induction_model():
    """2-layer induction model trained with ``head_dropout=0.5`` (cached on disk after the first run)."""
    from minterp_tl.models import train_induction_model

    return train_induction_model(2, head_dropout=0.5, progress=False)


def test_redundant_induction_half_size_subnetwork(redundant_induction_model):
    model = redundant_induction_model
    test = repeated_random_tokens(128, 11, 64, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(1)
    train = [repeated_random_tokens(48, L, 64, gen) for L in (8, 10, 12, 14, 17, 19, 22, 24)]
    report = induction_report(model, 11)
    with torch.no_grad():
        full = float(second_half_loss(model(test), test))
    # Exhaustive: some subset of <= 4 of the 8 heads keeps the loss within 10% of the full model.
    small = _subset_losses(model, test, range(0, 5))
    best = min(small, key=small.get)
    assert small[best] <= 1.10 * full
    # The learned head mask finds such a subset, with a previous-token and an induction head.
    hp = dict(ablation="none", mask_unit="head", mask_bias=False, mask_init_value=2.0)
    cfg = CircuitConfig("continuous_sparsification", hp, ("attn.W_O",), l0_lambda=0.15)
    circuit, _ = find_subnetwork(
        model, cfg, train, second_half_loss, steps=80, epochs=8, lr=0.1, progress=False
    )
    try:
        with torch.no_grad():
            heads = circuit.kept_heads()
            loss = float(second_half_loss(circuit(test), test))
            assert len(heads) <= 4 and loss <= 1.10 * full
            assert any(float(report.prev_token_scores[l, h]) > 0.5 for l, h in heads)
            assert any(float(report.induction_scores[l, h]) > 0.5 for l, h in heads)
            random_losses = []
            for i in range(8):
                circuit.set_ablate_mode("randomly_sampled", force_resample=True, seed=i)
                random_losses.append(float(second_half_loss(circuit(test), test)))
            assert sum(random_losses) / 8 > 3 * loss  # random same-size sets are far worse on average
            # Removing the found subnetwork: measured, not assumed (a redundant model could survive it).
            circuit.set_ablate_mode("zero_ablate")
            removed = float(second_half_loss(circuit(test), test))
            assert removed > 5 * full  # here the rest cannot do the task (0.338 -> 3.18, chance 4.16)
    finally:
        circuit.detach()
    # The subnetwork whose removal breaks the task: a mask trained to maximise the loss under zero_ablate
    # with a size penalty. It removes two induction heads; removing random pairs hurts far less.
    hp = dict(ablation="zero_ablate", mask_unit="head", mask_bias=False, mask_init_value=-2.0)
    cfg = CircuitConfig("continuous_sparsification", hp, ("attn.W_O",), l0_lambda=0.05)
    breaker, _ = find_subnetwork(
        model, cfg, train, second_half_loss, steps=80, epochs=8, lr=0.1, maximize=True, progress=False
    )
    try:
        with torch.no_grad():
            removed_heads = breaker.kept_heads()
            broken = float(second_half_loss(breaker(test), test))
    finally:
        breaker.detach()
    assert 1 <= len(removed_heads) <= 2 and broken > 0.8 * math.log(64)
    assert all(float(report.induction_scores[l, h]) > 0.5 for l, h in removed_heads)
    pairs = _subset_losses(model, test, [6])  # keep 6 of 8 = remove every pair
    assert sum(pairs.values()) / len(pairs) < 0.5 * broken
