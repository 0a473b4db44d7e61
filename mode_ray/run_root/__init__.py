"""A run root's files: where everything lives (layout), file systems and completion markers (storage),
what mode_ray may write and delete (ownership), the experts in service (registry), model names, and the
training-compute count read from the jobs' metrics."""
