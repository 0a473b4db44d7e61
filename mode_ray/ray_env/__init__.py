"""Ray and resources: starting or joining Ray from the config (runtime), and what each stage asks of a
cluster (resources)."""
