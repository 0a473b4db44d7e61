"""Model cards: the README.md of an export folder, so a model published to the Hugging Face Hub as it is says
what it is, what data made it, what it cost and how it scored, and how to load it."""

from __future__ import annotations

from typing import Any


def _front_matter(tags: list[str]) -> str:
    lines = ["---", "library_name: open_clip", "pipeline_tag: zero-shot-image-classification", "tags:"]
    return "\n".join([*lines, *(f"- {t}" for t in tags), "---", ""])


def _report_rows(report: dict[str, float] | None) -> list[str]:
    if not report:
        return ["Not evaluated yet: `mode-ray eval` fills this in."]
    tasks = [t for t in report if t != "average"] + (["average"] if "average" in report else [])
    return [
        "Zero-shot top-1 accuracy (%) from the run's `eval/report.md`:",
        "",
        "| " + " | ".join(tasks) + " |",
        "|" + "---|" * len(tasks),
        "| " + " | ".join(f"{100 * report[t]:.1f}" for t in tasks) + " |",
    ]


def dense_card(name: str, model: str, facts: dict[str, Any], report: dict[str, float] | None = None) -> str:
    """The card of one dense CLIP of a run: `facts` holds the run root, the data (partition, samples) and the
    compute (samples seen, seconds spent learning, steps)."""
    cluster = facts.get("cluster")
    data = (
        f"coarse cluster {cluster} of the run's caption clustering ({facts.get('partition_samples', '?')} pairs), "
        f"plus a {facts.get('ooc_ratio', 0):g} share of out-of-cluster pairs — a MoDE data expert"
        if cluster is not None
        else "every pair of the run's manifest"
    )
    start = "continued from the run's seed model" if facts.get("init_from_seed") else "trained from scratch"
    return "\n".join(
        [
            _front_matter(["clip", "mode_ray", "mode", "data-experts"]),
            f"# {name} ({model})",
            "",
            f"A CLIP trained by mode_ray ([MoDE](https://arxiv.org/abs/2404.16030) data experts on Ray) in the run "
            f"`{facts.get('run_root')}`: **{name}**, {start}.",
            "",
            "## Data",
            "",
            f"Trained on {data}.",
            "",
            "## Compute",
            "",
            f"- samples seen: {facts.get('samples_seen', 0):,} ({facts.get('steps', 0)} steps of "
            f"{facts.get('batch_size', '?')})" + (", the seed's share included" if facts.get("init_from_seed") else ""),
            f"- seconds spent learning: {facts.get('train_seconds', 0):.0f}",
            *_evaluation_and_load(
                report,
                [
                    "import open_clip",
                    "",
                    'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH/TO/THIS/FOLDER")',
                    'tokenizer = open_clip.get_tokenizer("local-dir:PATH/TO/THIS/FOLDER")',
                    '# once uploaded (huggingface-cli upload ORG/REPO PATH/TO/THIS/FOLDER): "hf-hub:ORG/REPO"',
                ],
            ),
        ]
    )


def _evaluation_and_load(report: dict[str, float] | None, code: list[str], intro: str | None = None) -> list[str]:
    """The card's last two sections: the report's row, and how to load the folder."""
    lead = [intro, ""] if intro else []
    return ["", "## Evaluation", "", *_report_rows(report), "", "## Load", "", *lead, "```python", *code, "```", ""]


def moe_card(facts: dict[str, Any], report: dict[str, float] | None = None) -> str:
    """The card of the run's CLIP-MoE (upcycled from a dense base with MCL stage experts, router fine-tuned)."""
    return "\n".join(
        [
            _front_matter(["clip", "mode_ray", "clip-moe", "mixture-of-experts"]),
            f"# CLIP-MoE from {facts.get('base', '?')}",
            "",
            f"A CLIP mixture of experts built by mode_ray in the run `{facts.get('run_root')}`: every MLP of the "
            f"chosen blocks became {facts.get('experts', '?')} experts (one per multistage-contrastive-learning "
            f"stage), top-{facts.get('top_k', '?')} routed, then only the routers were fine-tuned.",
            "",
            "## Compute",
            "",
            f"- samples (base, MCL stages and router): {facts.get('samples', 0):,}",
            f"- seconds spent learning: {facts.get('train_seconds', 0):.0f}",
            *_evaluation_and_load(
                report,
                [
                    "from mode_ray.models import load_model",
                    "",
                    'model, preprocess, tokenizer = load_model("PATH/TO/THIS/FOLDER")',
                ],
                "The MoE layers are mode_ray's own module (open_clip has none), so it loads with one call of mode_ray:",
            ),
        ]
    )


def write_card(cfg: Any, name: str, report: dict[str, float] | None = None) -> None:
    """Write (or refresh, once evaluated) the card of one model of a run into its export folder, from what the
    run recorded: the model's metrics.json (a dense model) or moe/summary.json (the CLIP-MoE)."""
    from mode_ray.models.clip import CARD_FILE
    from mode_ray.run_root.layout import MOE, RunPaths
    from mode_ray.run_root.storage import exists, join, read_json, write_bytes

    paths, s3 = RunPaths(cfg.run_root), cfg.data.s3
    if name == MOE:
        if not exists(paths.moe_summary, s3):
            return
        summary = read_json(paths.moe_summary, s3)
        facts = {
            "run_root": cfg.run_root,
            "base": cfg.moe.base,
            "experts": cfg.moe.stages,
            "top_k": cfg.moe.top_k,
            **summary.get("compute", {}),
        }
        text = moe_card(facts, report)
    else:
        metrics_url = join(paths.experts(name), "metrics.json")
        if not exists(metrics_url, s3):
            return
        m = read_json(metrics_url, s3)
        job = m["job"]
        per_expert = read_json(paths.prep_summary, s3).get("per_expert", {}) if exists(paths.prep_summary, s3) else {}
        facts = {
            "run_root": cfg.run_root,
            "cluster": job.get("expert"),
            "partition_samples": per_expert.get(str(job.get("expert"))),
            "ooc_ratio": cfg.training.ooc_ratio,
            "init_from_seed": job.get("init_from_seed"),
            "samples_seen": m["samples_seen"],
            "steps": m["steps"],
            "batch_size": m["batch_size"],
            "train_seconds": m["timing"]["compute"],
        }
        text = dense_card(name, m["model"], facts, report)
    write_bytes(join(paths.export(name), CARD_FILE), text.encode(), s3)
