"""Evaluation (every model, the routed ensembles, the controls → eval/report.*) as a Ray job:

ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.eval --config configs/cloud.yaml
"""

from __future__ import annotations

from jobs._args import run_job
from mode_ray.stages.evaluate import run_eval

if __name__ == "__main__":
    run_job(__doc__, run_eval)
