"""Task metadata → expert weights, in one place: the numpy-only weighting methods (weights: reference and
calibrated) and the router that embeds a task's class names with the clustering encoder and caches the
result (router: `TaskRouter`, used by eval and Serve alike)."""
