"""Grow a trained run with new data (new experts for what its clusters do not cover) as a Ray job:

ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.add_data --config configs/cloud.yaml \
    --set continual.shards=s3://bucket/new-shards --set continual.name=2026-12

Add `--set continual.refresh_experts=true` to also retrain the existing experts whose partitions grew.
"""

from __future__ import annotations

from jobs._args import run_job
from mode_ray.stages.grow import run_add_data

if __name__ == "__main__":
    run_job(__doc__, run_add_data)
