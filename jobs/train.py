"""Training (seed, data experts, generalist) as a Ray job:

ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.train --config configs/cloud.yaml
"""

from __future__ import annotations

from jobs._args import run_job
from mode_ray.stages.train import run_train

if __name__ == "__main__":
    run_job(__doc__, run_train)
