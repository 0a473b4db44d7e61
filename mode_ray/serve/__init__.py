"""Ray Serve: the ensemble (or one expert, or the MoE) online, in the Hugging Face Inference API shape."""
