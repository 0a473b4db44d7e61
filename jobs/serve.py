"""Deploy the zero-shot endpoint as a Ray job; the Serve app stays up on the cluster after the job ends:

ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.serve --config configs/cloud.yaml

(`serve deploy configs/serve.yaml` is the declarative alternative.)
"""

from __future__ import annotations

from jobs._args import run_job
from mode_ray.stages.serve import run_serve

if __name__ == "__main__":
    run_job(__doc__, lambda cfg, _: run_serve(cfg, keep_running=False, detach=True))
