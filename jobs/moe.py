"""CLIP-MoE (MCL stages, upcycling, router fine-tuning) as a Ray job, after training:

ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.moe --config configs/cloud.yaml
"""

from __future__ import annotations

from jobs._args import parse
from mode_ray.stages.moe import run_moe

if __name__ == "__main__":
    cfg, force = parse(__doc__)
    run_moe(cfg, force)
