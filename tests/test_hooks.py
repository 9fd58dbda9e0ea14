"""hooks: the layout, head counts and gather / scatter every module uses, against hand-written indexing."""

from __future__ import annotations

import pytest
import torch

from minterp_tl.hooks import gather, has_heads, hook_layout, layer_of, n_heads, scatter


def test_hook_layout_for_each_kind_of_hook() -> None:
    assert hook_layout("blocks.0.hook_resid_pre", 3) == (1, None)
    assert hook_layout("blocks.0.attn.hook_z", 4) == (1, 2)
    assert hook_layout("blocks.0.attn.hook_k", 4) == (1, 2)
    assert hook_layout("blocks.0.attn.hook_pattern", 4) == (2, 1)
    assert hook_layout("blocks.0.attn.hook_attn_scores", 4) == (2, 1)
    assert hook_layout("blocks.0.mlp.hook_post", 3) == (1, None)
    assert hook_layout("some_vector", 1) == (None, None)


# ---- gather / scatter against explicit loops ---------------------------------------------------


def _manual_gather(x, pos_axis, head_axis, positions, heads):
    out = []
    for b in range(x.shape[0]):
        item = x[b]
        if heads is not None:
            item = item.index_select(head_axis - 1, torch.tensor(heads))
        if positions is not None:
            item = item.index_select(pos_axis - 1, positions[b])
        out.append(item)
    return torch.stack(out)


LAYOUTS = [
    ("blocks.0.hook_resid_pre", (3, 7, 5)),
    ("blocks.0.attn.hook_z", (3, 7, 4, 2)),
    ("blocks.0.attn.hook_pattern", (3, 4, 7, 7)),
]


@pytest.mark.parametrize("name,shape", LAYOUTS)
@pytest.mark.parametrize("per_prompt", [False, True])
def test_gather_matches_manual_indexing(name, shape, per_prompt) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    pos_axis, head_axis = hook_layout(name, len(shape))
    positions = torch.tensor([[6, 2], [1, 3], [0, 5]]) if per_prompt else torch.tensor([[4, 1]] * 3)
    heads = [3, 0] if head_axis is not None else None
    got = gather(x, pos_axis, head_axis, positions, heads)
    assert torch.equal(got, _manual_gather(x, pos_axis, head_axis, positions, heads))
    # the copy owns its memory: it does not keep the full activation alive or alias it
    assert got.untyped_storage().nbytes() == got.numel() * got.element_size()
    assert torch.equal(gather(x, pos_axis, head_axis, None, None), x)


@pytest.mark.parametrize("name,shape", LAYOUTS)
@pytest.mark.parametrize("mode", ["set", "add"])
def test_scatter_matches_manual_writes(name, shape, mode) -> None:
    torch.manual_seed(1)
    x = torch.randn(shape)
    pos_axis, head_axis = hook_layout(name, len(shape))
    positions = torch.tensor([[6, 2], [1, 3], [0, 5]])
    heads = [3, 0] if head_axis is not None else None
    region = list(shape)
    region[pos_axis] = 2
    if head_axis is not None:
        region[head_axis] = 2
    value = torch.randn(region)
    x0 = x.clone()
    got = scatter(x, value, pos_axis, head_axis, positions, heads, mode)

    expected = x.clone()
    for b in range(shape[0]):
        for j, p in enumerate(positions[b].tolist()):
            for hj, h in enumerate(heads if heads is not None else [None]):
                dst = [b, slice(None), slice(None), slice(None)][: len(shape)]
                src = [b, slice(None), slice(None), slice(None)][: len(shape)]
                dst[pos_axis], src[pos_axis] = p, j
                if h is not None:
                    dst[head_axis], src[head_axis] = h, hj
                if mode == "add":
                    expected[tuple(dst)] += value[tuple(src)]
                else:
                    expected[tuple(dst)] = value[tuple(src)]
    assert torch.equal(got, expected)
    assert torch.equal(x, x0)  # the input is not modified in place


def test_scatter_broadcasts_a_vector_and_rejects_a_misfit() -> None:
    x = torch.zeros(2, 5, 3)
    v = torch.tensor([1.0, 2.0, 3.0])
    out = scatter(x, v, 1, None, torch.tensor([[4], [0]]), None, "add")
    assert torch.equal(out[0, 4], v) and torch.equal(out[1, 0], v)
    assert out.abs().sum() == 2 * v.sum()
    with pytest.raises(ValueError, match=r"shape \(4, 1, 3\).*region of shape \(2, 1, 3\)"):
        scatter(x, torch.zeros(4, 1, 3), 1, None, torch.tensor([[4], [0]]), None, what="clean/x")


def test_one_head_count_rule_for_grouped_query_attention(toys) -> None:
    gqa, ln = toys["gqa"], toys["ln"]
    kv = gqa.cfg.n_key_value_heads
    assert kv < gqa.cfg.n_heads
    for hook in ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k"):
        assert n_heads(gqa, f"blocks.0.{hook}") == kv and n_heads(gqa.cfg, f"blocks.1.{hook}") == kv
    for hook in ("attn.hook_q", "attn.hook_z", "attn.hook_pattern", "attn.hook_rot_q", "attn.hook_result"):
        assert n_heads(gqa, f"blocks.0.{hook}") == gqa.cfg.n_heads
    assert n_heads(ln, "blocks.0.attn.hook_k") == ln.cfg.n_heads
    # the rule matches the activations the models produce
    _, cache = gqa.run_with_cache(torch.zeros(1, 3, dtype=torch.long))
    for name in (
        "blocks.0.attn.hook_k",
        "blocks.0.attn.hook_v",
        "blocks.0.attn.hook_q",
        "blocks.0.attn.hook_z",
    ):
        assert cache[name].shape[2] == n_heads(gqa, name), name
    assert has_heads("blocks.0.attn.hook_pattern") and not has_heads("blocks.0.hook_resid_pre")
    assert layer_of("blocks.12.attn.hook_z") == 12 and layer_of("hook_embed") is None
