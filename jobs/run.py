"""The whole pipeline (demo data when configured, prep, training, the CLIP-MoE, evaluation, the endpoint) as a
Ray job; every stage skips itself when its outputs are complete, so a resubmitted job resumes:

ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.run --config configs/cloud.yaml

`--only STAGE` (repeatable) runs only those stages, as `mode-ray run --only` does.
"""

from __future__ import annotations

from jobs._args import run_job
from mode_ray.pipeline import STAGES, run_all

if __name__ == "__main__":
    run_job(__doc__, run_all, stages=[name for name, _ in STAGES])
