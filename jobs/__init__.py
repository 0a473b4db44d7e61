"""Entry points for `ray job submit -- python -m jobs.X --config FILE` (thin: parse, then call a stage)."""
