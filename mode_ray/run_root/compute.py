"""The one count of training compute (Ray-free): what every model, the ensemble and the CLIP-MoE cost, in
samples and seconds, from the `metrics.json` of the jobs behind them. A model continuing the seed carries the
seed's share; the ensemble pays for the seed once and every expert; the MoE its base's, its MCL stages' and
its router's. `train_seconds` is time spent learning (forward, backward, step); `trial_seconds` adds every
fixed cost."""

from __future__ import annotations

from typing import Any

from mode_ray.run_root.names import SEED, expert_id


def cost(models: dict[str, dict[str, Any]], names: list[str]) -> dict[str, float]:
    """Samples and seconds of the jobs `names`, added up."""
    return {
        "samples": sum(models[n]["samples_seen"] for n in names),
        "train_seconds": sum(models[n]["timing"]["compute"] for n in names),
        "trial_seconds": sum(models[n]["timing"]["trial"] for n in names),
    }


def model_compute(models: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per model of the run (its metrics.json, by name), and `ensemble` when it has data experts."""
    seed = [SEED] if SEED in models else []
    out = {name: cost(models, (seed if m["job"]["init_from_seed"] else []) + [name]) for name, m in models.items()}
    experts = [n for n in models if expert_id(n) is not None]
    if experts:
        out["ensemble"] = cost(models, seed + experts)
    return out


def moe_compute(base: dict[str, Any], parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The MoE's cost: its base's (empty when the base came from elsewhere) plus its own jobs' (`parts`)."""
    own = cost(parts, list(parts))
    return {
        "samples": base.get("samples", 0) + own["samples"],
        "train_seconds": base.get("train_seconds", 0.0) + own["train_seconds"],
        "trial_seconds": base.get("trial_seconds", 0.0) + own["trial_seconds"],
        "moe_samples": own["samples"],
        "base_compute_known": bool(base),
    }


def report_rows(
    summary: dict[str, Any], ensembles: list[str], moe: dict[str, Any] | None, moe_name: str
) -> dict[str, dict[str, Any]]:
    """Per report row: the samples behind the model's weights (none for an ensemble: it trains nothing of its
    own) and the training compute it took to make it."""
    compute = summary["compute"]

    def row(c: dict[str, Any], trained: bool) -> dict[str, Any]:
        return {
            "trained_samples": c["samples"] if trained else None,
            "compute_samples": c["samples"],
            "train_seconds": c["train_seconds"],
        }

    out = {name: row(compute[name], True) for name in summary["models"]}
    out.update({name: row(compute["ensemble"], False) for name in ensembles})
    if moe is not None:
        out[moe_name] = row(moe["compute"], True)
    return out
