"""Inference cost of a CLIP-MoE against its dense base, per image and per caption, measured in the same run.

    python bench/moe.py [--model mode-demo] [--experts 4] [--images 2048] [--repeats 5] [--model-dir DIR]

Upcycles the base (random weights: cost does not depend on them) into MoEs of `--experts` experts a layer at
top-1, top-2 and top-all, or loads a trained MoE from `--model-dir` (a run's moe/model), and times
`encode_image` and `encode_text` in batches of 256 on one thread. Prints seconds per 1,000 inputs and the ratio
to the base: the reference's claim is a MoE at little extra inference cost; dispatch by index makes the cost
grow with top-k, not with the number of experts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_models(
    models: dict[str, torch.nn.Module], images: torch.Tensor, texts: torch.Tensor, repeats: int
) -> dict[str, dict[str, float]]:
    """Median seconds per 1,000 images / captions over `repeats` rounds, after a warm-up round. Each round
    times every model in turn, so a machine whose speed drifts (this one varies by ~40% between runs) slows
    every model alike instead of whichever ran last."""
    runs: dict[str, dict[str, list[float]]] = {name: {"image": [], "text": []} for name in models}
    with torch.no_grad():
        for r in range(repeats + 1):
            for name, model in models.items():
                for tower, fn, data in (("image", model.encode_image, images), ("text", model.encode_text, texts)):
                    start = time.perf_counter()
                    for i in range(0, len(data), 256):
                        fn(data[i : i + 256])
                    if r:
                        runs[name][tower].append(time.perf_counter() - start)
    return {
        name: {tower: statistics.median(t) * 1000 / len(images) for tower, t in towers.items()}
        for name, towers in runs.items()
    }


def main() -> None:
    from mode_ray.models import load_model
    from mode_ray.models.clip import build_clip, model_config
    from mode_ray.models.moe import MoESpec, mlp_state, moe_layers, upcycle

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mode-demo")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-dir", default=None, help="a trained MoE folder (run_root/moe/model) instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    cfg = model_config(args.model)
    side, context = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    images = torch.randn(args.images, 3, side, side)
    texts = torch.randint(1, 1000, (args.images, context))

    models = {"dense base": build_clip(args.model)[0].eval()}
    if args.model_dir:
        moe = load_model(args.model_dir)[0]
        layer = next(iter(moe_layers(moe)))[2]
        models[f"trained MoE ({layer.n_experts} experts, top-{layer.top_k})"] = moe
    else:
        for k in sorted({1, 2, args.experts}):
            donors = [mlp_state(build_clip(args.model)[0]) for _ in range(args.experts)]
            moe = upcycle(build_clip(args.model)[0], donors, MoESpec(args.model, cfg, args.experts, k)).eval()
            models[f"MoE {args.experts} experts, top-{k}"] = moe
    rows = time_models(models, images, texts, args.repeats)

    ref = rows["dense base"]
    print(f"{'model':<32} {'ms/1k images':>13} {'× base':>7} {'ms/1k captions':>15} {'× base':>7}")
    for name, r in rows.items():
        print(
            f"{name:<32} {r['image'] * 1000:>13.1f} {r['image'] / ref['image']:>7.2f} "
            f"{r['text'] * 1000:>15.1f} {r['text'] / ref['text']:>7.2f}"
        )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
