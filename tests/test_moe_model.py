"""The MoE layer, upcycling, the balance loss and MoE checkpoints: plain torch on a tiny random open_clip."""

from __future__ import annotations

import copy

import pytest
import torch

from mode_ray.models.clip import build_clip, model_config
from mode_ray.models.moe import (
    MoEMLP,
    MoESpec,
    balance_loss,
    expert_usage,
    load_moe,
    mlp_state,
    moe_balance_loss,
    moe_layers,
    save_moe,
    set_trainable,
    track_usage,
    upcycle,
)


def _mlp(width: int = 16, seed: int = 0) -> torch.nn.Module:
    model, *_ = build_clip("mode-tiny")
    torch.manual_seed(seed)
    return copy.deepcopy(model.transformer.resblocks[0].mlp)


def test_identical_experts_equal_the_dense_mlp_for_any_router() -> None:
    dense = _mlp()
    for seed in range(3):
        moe = MoEMLP([copy.deepcopy(dense) for _ in range(4)], top_k=2)
        torch.manual_seed(seed)
        torch.nn.init.normal_(moe.gate.weight, std=3.0)
        x = torch.randn(5, 7, dense.c_fc.in_features)
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-6, atol=1e-6)


def test_top_k_picks_k_distinct_experts_and_weights_sum_to_one() -> None:
    moe = MoEMLP([_mlp() for _ in range(4)], top_k=2)
    tokens = torch.randn(50, moe.gate.in_features)
    probs, weights, picks = moe.route(tokens)
    assert picks.shape == (50, 2)
    assert (picks[:, 0] != picks[:, 1]).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    torch.testing.assert_close(probs.sum(-1), torch.ones(50))
    # the picks are the most probable experts
    assert (probs.gather(1, picks).min(1).values >= probs.topk(2).values[:, 1] - 1e-7).all()


def test_dispatch_runs_each_expert_only_on_its_tokens() -> None:
    moe = MoEMLP([_mlp() for _ in range(4)], top_k=1)
    calls: list[int] = []
    for expert in moe.experts:
        expert.c_fc.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    moe(torch.randn(3, 10, moe.gate.in_features))
    assert sum(calls) == 30  # top-1: every token through exactly one expert, not all four


def test_balance_loss_is_one_for_a_uniform_router_and_n_for_a_collapsed_one() -> None:
    n, e = 64, 4
    uniform = torch.full((n, e), 1 / e)
    spread = torch.arange(n).remainder(e).unsqueeze(1)
    assert balance_loss(uniform, spread, e).item() == pytest.approx(1.0)
    collapsed = torch.zeros(n, e)
    collapsed[:, 0] = 1.0
    assert balance_loss(collapsed, torch.zeros(n, 1, dtype=torch.long), e).item() == pytest.approx(e)
    skewed = torch.softmax(torch.randn(n, e) * 3, -1)
    assert balance_loss(skewed, skewed.topk(2).indices, e).item() >= 1.0 - 1e-6


def test_upcycle_only_routers_train_and_usage_is_counted() -> None:
    base, *_ = build_clip("mode-tiny")
    stages = [mlp_state(base)]
    for seed in (1, 2):
        other, *_ = build_clip("mode-tiny")
        torch.manual_seed(seed)
        stages.append(mlp_state(other))
    spec = MoESpec("mode-tiny", model_config("mode-tiny"), n_experts=3, top_k=2)
    model = upcycle(base, stages, spec)
    assert len(list(moe_layers(model))) == sum(len(v) for v in spec.layers.values())
    names = set_trainable(model, "router")
    assert names and all(n.endswith("mlp.gate.weight") for n in names)
    track_usage(model)
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4, 32))
    model.encode_image(images)
    model.encode_text(texts)
    assert moe_balance_loss(model, "top1", 0.5).item() > 0
    usage = expert_usage(model)
    assert set(usage) == {"image", "text"}
    assert all(sum(shares) == pytest.approx(1.0) for layer in usage.values() for shares in layer.values())


def test_saved_moe_loads_back_identical(tmp_path) -> None:
    base, *_ = build_clip("mode-tiny")
    other, *_ = build_clip("mode-tiny")
    spec = MoESpec("mode-tiny", model_config("mode-tiny"), n_experts=2, top_k=1)
    model = upcycle(base, [mlp_state(base), mlp_state(other)], spec).eval()
    save_moe(model, spec, str(tmp_path / "moe"))
    loaded, loaded_spec, transform, tokenizer = load_moe(str(tmp_path / "moe"))
    assert loaded_spec.layers == spec.layers
    texts = tokenizer(["a photo of a cat", "a red square"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(texts), model.encode_text(texts))
        image = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(loaded.encode_image(image), model.encode_image(image))
