"""The built-in demo dataset (demo_data) and the harder variant's domains (demo_hard)."""
