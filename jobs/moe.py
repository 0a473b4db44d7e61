"""CLIP-MoE (MCL stages, upcycling, router fine-tuning) as a Ray job, after training:

ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.moe --config configs/cloud.yaml
"""

from __future__ import annotations

from jobs._args import run_job
from mode_ray.stages.moe import run_moe

if __name__ == "__main__":
    run_job(__doc__, run_moe)
