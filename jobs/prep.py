"""MoDE data prep as a Ray job:

ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.prep --config configs/cloud.yaml
"""

from __future__ import annotations

from jobs._args import run_job
from mode_ray.stages.prep import run_prep

if __name__ == "__main__":
    run_job(__doc__, run_prep)
