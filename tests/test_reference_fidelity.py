"""Where mode_ray can compute what the references compute: each formula pinned against a transcription of
the reference's own lines (cited per test; transcribed as arithmetic, not copied), under `preset: reference`."""

from __future__ import annotations

import math

import pytest
import torch

from mode_ray.config import Config
from mode_ray.train.schedule import Schedule


def _reference_cosine_lr(base_lr: float, warmup: int, total: int, step: int) -> float:
    """open_clip's `cosine_lr` (src/open_clip_train/scheduler.py), which MetaCLIP's training (apps/mode) and
    CLIP-MoE's train scripts call: linear warmup (step + 1) / warmup, then a half cosine over the steps after
    warmup: 0.5 · (1 + cos(π · (step − warmup) / (total − warmup))) · base."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) * base_lr


@pytest.mark.parametrize(("warmup", "total"), [(200, 1250), (10, 64), (2000, 40000)])
def test_cosine_after_warmup_is_the_references_schedule(warmup: int, total: int) -> None:
    ours = Schedule(1e-5, warmup, total, 0, decay_after_warmup=True)
    for step in sorted({0, 1, warmup - 1, warmup, warmup + 1, total // 2, total - 2, total - 1}):
        assert ours.lr(step) == pytest.approx(_reference_cosine_lr(1e-5, warmup, total, step), rel=1e-12, abs=0)
    # today's default decays over the whole schedule: below the reference's rate after warmup, as documented
    default = Schedule(1e-5, warmup, total, 0)
    mid = warmup + (total - warmup) // 2
    assert default.lr(mid) < ours.lr(mid)


def _config(*sets: str) -> Config:
    from mode_ray.config import load_config
    from tests.conftest import REPO

    return load_config(REPO / "configs/demo.yaml", list(sets))


def test_the_reference_preset_sets_what_differs_and_an_explicit_setting_wins() -> None:
    reference = _config("preset=reference")
    assert reference.training.lr_decay == "after_warmup" and reference.moe.mcl_optim.lr_decay == "after_warmup"
    assert reference.moe.router_optim.lr_decay == "after_warmup"
    m = reference.moe
    assert (m.router_label_smoothing, m.router_temperature, m.router_optim.warmup_steps, m.router_optim.kind) == (
        0.1,
        0.01,
        200,
        "reference",
    )
    assert m.mcl_optim.kind == "reference" and reference.training.kind == "mode_ray"  # MoDE's is open_clip's
    assert (m.balance_form, m.mcl_last_batch, m.mcl_batch_order) == ("reference", "drop", "round_robin")
    assert reference.training.caption_draw == "per_read" and _config().training.caption_draw == "per_sample"
    assert reference.clustering.geometry == "euclidean"
    nested = _config("preset=reference", "moe.top_k=1")  # a sibling set in the same section: the preset still fills
    assert nested.moe.balance_form == "reference" and nested.moe.top_k == 1
    today = _config()
    assert today.training.lr_decay == "whole_schedule" and today.moe.mcl_optim.kind == "mode_ray"
    assert today.moe.router_optim.kind == "mode_ray"
    assert today.clustering.geometry == "spherical" and today.eval.routing.reference_centres == "raw_means"
    assert today.moe.router_temperature is None and today.moe.router_label_smoothing == 0.0
    mixed = _config("preset=reference", "moe.router_optim.warmup_steps=5")
    assert mixed.moe.router_optim.warmup_steps == 5 and mixed.moe.router_label_smoothing == 0.1
    assert mixed.moe.router_optim.kind == "reference"  # a sibling in the same block: the preset still fills


def test_router_stage_loss_under_the_preset_is_the_references() -> None:
    """CLIP-MoE's router fine-tuning (train/train_moe.py): logit scale fixed at 100, and the CLIP loss
    (cross-entropy both ways, averaged) with label smoothing 0.1."""
    from mode_ray.train.losses import SmoothedClipLoss

    loss = router_job(_config("preset=reference")).loss
    assert loss.fixed_temperature == 0.01 and loss.label_smoothing == 0.1
    torch.manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(8, 16), dim=-1) for _ in range(2))
    scale = torch.tensor(1 / loss.fixed_temperature)
    logits = scale * image @ text.T
    labels = torch.arange(8)
    expected = (
        torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
        + torch.nn.functional.cross_entropy(logits.T, labels, label_smoothing=0.1)
    ) / 2
    ours = SmoothedClipLoss(loss.label_smoothing)(image, text, scale)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)


def router_job(cfg: Config):  # noqa: ANN201
    """The router job as planned, from an outside base (no MCL stage needs to exist to plan it)."""
    from mode_ray.runner.plan_jobs import MoEBase, inputs_of, moe_jobs

    return moe_jobs(cfg, MoEBase("/nowhere", identity="base"), inputs_of(cfg, "manifest"), 1000)[-1]


def test_the_reference_optimizer_is_torch_adamw_defaults_with_decay_everywhere() -> None:
    """CLIP-MoE's train scripts build `torch.optim.AdamW(params, lr=…, weight_decay=…)`: β (0.9, 0.999),
    ε 1e-8, one group (every trainable parameter decays)."""
    from mode_ray.models.clip import build_clip
    from mode_ray.train.job import Optimizer
    from mode_ray.train.loop import make_optimizer

    model, *_ = build_clip("mode-tiny")
    ours = make_optimizer(model, Optimizer("reference", 0.2, (0.9, 0.98), 1e-6), 1e-5)
    reference = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.2)
    assert len(ours.param_groups) == 1
    for key in ("betas", "eps", "weight_decay", "lr"):
        assert ours.param_groups[0][key] == reference.param_groups[0][key]
    assert sum(p.numel() for p in ours.param_groups[0]["params"]) == sum(p.numel() for p in model.parameters())
    today = make_optimizer(model, Optimizer("mode_ray", 0.2, (0.9, 0.98), 1e-6), 1e-5)  # open_clip's split
    assert [g["weight_decay"] for g in today.param_groups] == [0.0, 0.2] and today.param_groups[0]["betas"] == (
        0.9,
        0.98,
    )


def test_a_jobs_hash_is_what_the_job_is() -> None:
    """Completion markers hash the planned job itself: the reference's settings change every job they reach
    (the MCL stages and the router too); how a job runs does not; a cosine over the whole schedule (the
    setting's first form) is left out, so it hashes as before the setting existed."""
    from mode_ray.runner.plan_jobs import MoEBase, inputs_of, make_plan, moe_jobs, training_jobs
    from mode_ray.train.job import hashed_fields, job_hashes

    def hashes(cfg: Config) -> dict[str, str]:
        plan, inputs = make_plan(cfg, {"0": 100, "1": 100}), inputs_of(cfg, "manifest")
        jobs = training_jobs(cfg, plan, inputs, None) + moe_jobs(cfg, MoEBase("/x", job="generalist"), inputs, 200)
        return job_hashes(jobs)

    today, reference = _config(), _config("preset=reference")
    ran_otherwise = _config(
        "training.run.max_failures=7", "training.run.fail_once_at_step={seed: 3}", "training.run.num_workers=2"
    )
    assert hashes(ran_otherwise) == hashes(today)
    changed = {n for n, h in hashes(reference).items() if h != hashes(today)[n]}
    assert {"seed", "generalist", "moe-stage-1", "moe-router"} <= changed
    job = training_jobs(today, make_plan(today, {"0": 100}), inputs_of(today, "m"), None)[0]
    assert "decay_after_warmup" not in hashed_fields(job)["schedule"]


def _reference_load_balancing(gate_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """CLIP-MoE's `load_balancing_loss_func` (clipmoe/model_clipmoe.py), transcribed: gate logits of all a
    tower's layers [L, N, E] flattened to tokens; softmax; top-k one-hot [T, k, E] averaged over tokens
    ([k, E]: per slot, so summed over slots the shares make k); times the mean probability per expert; summed;
    times E."""
    n_experts = gate_logits.shape[-1]
    probs = torch.softmax(gate_logits.reshape(-1, n_experts), dim=-1)
    picks = torch.topk(probs, top_k, dim=-1).indices
    per_slot = torch.nn.functional.one_hot(picks, n_experts).float().mean(dim=0)
    return torch.sum(per_slot * probs.mean(dim=0).unsqueeze(0)) * n_experts


@pytest.mark.parametrize(("n_experts", "top_k", "world"), [(4, 2, 1), (4, 2, 4), (8, 1, 2), (8, 4, 1)])
def test_balance_loss_in_the_references_form(n_experts: int, top_k: int, world: int) -> None:
    """`balance_form: reference` on an upcycled model equals the reference's function on the same router
    logits, pooled over the tower's layers and divided by the world size; `per_layer` is the paper's mean."""
    from mode_ray.models.clip import build_clip
    from mode_ray.models.moe import MoESpec, balance_loss, mlp_state, moe_balance_loss, moe_layers, upcycle

    base, *_ = build_clip("mode-tiny")
    stages = [mlp_state(base)] * n_experts
    spec = MoESpec("mode-tiny", {}, n_experts=n_experts, top_k=top_k, towers=["image"])
    model = upcycle(base, stages, spec, router_seed=3)
    logits = []
    for _, _, layer in moe_layers(model):  # record every layer's router logits on a forward pass
        layer.gate.register_forward_hook(lambda m, i, out: logits.append(out.detach().reshape(-1, n_experts)))
    torch.manual_seed(0)
    model.encode_image(torch.randn(3, 3, 32, 32))
    expected = _reference_load_balancing(torch.stack(logits), top_k) / world
    ours = moe_balance_loss(model, "topk", 0.5, "reference", world)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    per_layer = torch.stack(
        [balance_loss(layer.last_probs, layer.last_topk, n_experts, "topk") for _, _, layer in moe_layers(model)]
    ).mean()
    torch.testing.assert_close(moe_balance_loss(model, "topk", 0.5), per_layer)
    # one layer: the reference's value is k times `topk`'s (its per-slot shares sum to k)
    _, _, first = next(iter(moe_layers(model)))
    single = _reference_load_balancing(logits[0][None], top_k)
    torch.testing.assert_close(single, top_k * balance_loss(first.last_probs, first.last_topk, n_experts, "topk"))


def _reference_sampler_epoch(labels: list[int], batch: int, world: int, n_clusters: int) -> tuple[list[int], int]:
    """CLIP-MoE's `MCL_batch_sampler_DDP.__iter__` (train/dataset.py), transcribed for one epoch seen as global
    batches: each cluster truncated to ⌊n / (world · batch)⌋ whole global batches, then one batch of each
    cluster in turn (label 0, 1, …), skipping clusters that ran out. Returns the clusters of the batches in
    order, and the rows left out."""
    global_batch = batch * world
    left = {c: sum(1 for x in labels if x == c) // global_batch for c in range(n_clusters)}
    dropped = sum(sum(1 for x in labels if x == c) % global_batch for c in range(n_clusters) if left[c])
    dropped += sum(sum(1 for x in labels if x == c) for c in range(n_clusters) if not left[c])
    order, c = [], 0
    while any(left.values()):
        if left[c]:
            order.append(c)
            left[c] -= 1
        c = (c + 1) % n_clusters
    return order, dropped


def test_mcl_sampler_truncates_and_walks_clusters_round_robin_as_the_reference() -> None:
    import numpy as np

    from mode_ray.train.sampler import epoch_steps, homogeneous_batches

    rng = np.random.default_rng(4)
    labels = rng.choice(5, size=1917, p=[0.4, 0.25, 0.2, 0.1, 0.05])
    batch, world = 32, 2
    order, dropped = _reference_sampler_epoch(labels.tolist(), batch // world, world, 5)
    steps = epoch_steps(labels, batch, 1.0, "drop")
    assert steps == len(order)
    plan = homogeneous_batches(labels, batch, steps, world, seed=0, last_batch="drop", order="round_robin")
    assert plan.labels.tolist() == order and plan.filled == 0
    small_rows = sum(plan.small_clusters.values())
    assert plan.dropped + small_rows == dropped  # truncated rows, and clusters smaller than one global batch
    for rows, label in zip(plan.batches, plan.labels, strict=True):
        assert len(set(rows.tolist())) == batch and (labels[rows] == label).all()
    default = homogeneous_batches(labels, batch, epoch_steps(labels, batch, 1.0), world, seed=0)
    assert default.dropped == 0 and default.filled > 0 and len(default.batches) > steps


def test_euclidean_geometry_assigns_by_l2_to_member_means_and_counts_where_the_geometries_disagree() -> None:
    """The reference's k-means is Euclidean: a point belongs to its L2-nearest centre (prep_inference.py's
    argmin) and a centre is its members' raw mean. Checked by brute force against the inner-product search."""
    import numpy as np

    from mode_ray import kmeans
    from mode_ray.encoders import l2_normalize

    rng = np.random.default_rng(7)
    x = l2_normalize(rng.normal(size=(3000, 24)).astype(np.float32) + 2.0 * rng.normal(size=(1, 24)))
    fit = kmeans.two_step(x, 24, 3, seed=1, balanced=False, geometry="euclidean")
    norms = np.linalg.norm(fit.fine, axis=1)
    assert (norms < 0.999).all()  # raw means, not unit vectors
    fine_ids, _, _ = fit.assign(x)
    by_l2 = ((x[:, None, :].astype(np.float64) - fit.fine[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    assert (fine_ids == by_l2).all()
    np.testing.assert_allclose(fit.fine_raw, kmeans.member_means(x, fine_ids, 24), atol=1e-5)
    assert (fit.fine_to_coarse == kmeans.nearest(fit.fine, fit.coarse, geometry="euclidean")[1][:, 0]).all()
    # the count the prep summary reports: nearest unit centre by cosine vs nearest raw mean by L2
    raw = fit.fine_raw.astype(np.float64)
    by_cos = (x @ (raw / np.linalg.norm(raw, axis=1, keepdims=True)).T).argmax(1)
    by_l2_raw = ((x[:, None, :] - raw[None]) ** 2).sum(-1).argmin(1)
    assert fit.info["geometries_disagree_on"] == int((by_cos != by_l2_raw).sum())
    balanced = kmeans.two_step(x, 24, 3, seed=1, geometry="euclidean")  # size-constrained, still L2
    assert balanced.fine_sizes.max() <= -(-len(x) // 24) and (np.linalg.norm(balanced.fine, axis=1) < 0.999).all()


class _FixedEncoder:
    """Stands in for the routing encoder: fixed label embeddings, so the test is about the centres."""

    encoder_id = "test:fixed"

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors

    def encode(self, texts: list[str]):  # noqa: ANN201
        import numpy as np

        return np.array([self.vectors[t] for t in texts], dtype=np.float32)


def test_the_reference_router_on_raw_member_means_is_the_released_formula() -> None:
    """post_report_ensemble.py measures each label's L2 distance to the stored (raw) fine means; the router
    does exactly that by default (`reference_centres: raw_means`); `unit` measures to the unit centres. A run
    from before raw means falls back to its unit centres, unless raw means were asked for by name."""
    import numpy as np

    from mode_ray.config import RoutingConfig
    from mode_ray.routing.router import TaskRouter
    from tests.test_routing import FINE, FINE_TO_COARSE, LABELS, _by_hand

    raw = FINE * np.array([[0.7], [0.8], [0.65], [0.9]])  # member means of unit points: shorter than 1
    cents = {"fine": FINE, "fine_raw": raw, "coarse": FINE[:3], "fine_to_coarse": FINE_TO_COARSE}
    cents["encoder_id"] = np.array(_FixedEncoder.encoder_id)
    encoder = _FixedEncoder({f"l{i}": v for i, v in enumerate(LABELS.tolist())})
    names = [f"l{i}" for i in range(len(LABELS))]
    on_raw = TaskRouter(cents, encoder, RoutingConfig(reference_centres="raw_means")).route(names, ("{}",))
    np.testing.assert_allclose(on_raw.weights, _by_hand(LABELS.tolist(), raw.tolist(), FINE_TO_COARSE.tolist(), 3))
    by_default = TaskRouter(cents, encoder, RoutingConfig())
    assert by_default.reference_centres == "raw_means"
    np.testing.assert_allclose(by_default.route(names, ("{}",)).weights, on_raw.weights)
    on_unit = TaskRouter(cents, encoder, RoutingConfig(reference_centres="unit")).route(names, ("{}",))
    np.testing.assert_allclose(on_unit.weights, _by_hand(LABELS.tolist(), FINE.tolist(), FINE_TO_COARSE.tolist(), 3))
    assert not np.allclose(on_raw.distance, on_unit.distance)
    del cents["fine_raw"]
    old_run = TaskRouter(cents, encoder, RoutingConfig())
    assert old_run.reference_centres.startswith("unit") and np.allclose(old_run.reference_fine, FINE)
    with pytest.raises(ValueError, match="predates raw member means"):
        TaskRouter(cents, encoder, RoutingConfig(reference_centres="raw_means"))


def test_captions_drawn_per_read_as_the_reference(tmp_path) -> None:
    """The reference's loader draws one of a sample's `texts` on every read (mode_wds.py: random.choice). With
    `training.caption_draw: per_read` every training read draws, from the manifest or from the decoded cache's
    tokens of every text; validation and the cache's own caption keep prep's seeded pick."""
    import dataclasses
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mode_ray.data.train_data import Source, _inputs, _read_groups, decode_to_cache
    from mode_ray.demo import demo_data
    from mode_ray.samples.validate import Limits, validate_row
    from mode_ray.train.transforms import input_spec, tokenize

    img, _ = demo_data.DRAW["shapes"](np.random.default_rng(0), "train")
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    meta = {"texts": ["a red star", "a star drawn in red", "red star"]}
    row = validate_row({"key": "k", "shard": "s", "json": json_bytes(meta), "image": buf.getvalue()}, Limits("texts"))
    assert row["texts"] == meta["texts"] and row["caption"] in meta["texts"]
    table = pa.table(
        {
            "key": ["a", "b"],
            "image": [buf.getvalue()] * 2,
            "caption": [row["caption"], "only one"],
            "texts": [meta["texts"], None],
        }
    )
    path = tmp_path / "part.parquet"
    pq.write_table(table, path)
    items = {"path": np.array([str(path)]), "row_group": np.array([0]), "coarse_id": np.array([0])}
    spec = input_spec("mode-tiny")
    manifest = Source(str(tmp_path), False, "mode-tiny", {}, spec.load, spec.context_length, True)
    rows = _read_groups(items, manifest, lambda t, _: np.ones(len(t), dtype=bool))
    tokens = {t: tokenize([t], "mode-tiny")[0] for t in [*meta["texts"], "only one"]}
    cache = decode_to_cache(items, manifest)
    cached = dataclasses.replace(manifest, root=str(tmp_path), decoded=True)
    for source, table_in in ((manifest, rows), (cached, cache)):
        rng, seen = np.random.default_rng(1), set()
        for _ in range(40):
            text = _inputs(table_in, source, rng)["text"]
            seen |= {t for t in meta["texts"] if (text[0] == tokens[t]).all()}
            assert (text[1] == tokens["only one"]).all()  # no texts: its one caption
        assert seen == set(meta["texts"])
        assert (_inputs(table_in, source)["text"][0] == tokens[row["caption"]]).all()  # no draw: prep's pick
    old = tmp_path / "old.parquet"  # a manifest from before per-read captions
    pq.write_table(table.drop_columns(["texts"]), old)
    with pytest.raises(ValueError, match="has no texts column: training.caption_draw=per_read"):
        _read_groups({**items, "path": np.array([str(old)])}, manifest, lambda t, _: np.ones(len(t), dtype=bool))


def json_bytes(value: object) -> bytes:
    import json

    return json.dumps(value).encode()
