"""Zero-shot classification, retrieval, task routing and the evaluation report (no Ray here)."""
