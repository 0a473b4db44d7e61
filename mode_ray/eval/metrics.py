"""Metric names, as the report, the suite average and CLIP_benchmark spell them (no heavy imports here:
config checks read them before anything runs)."""

ACCURACY = "accuracy"
MEAN_PER_CLASS_RECALL = "mean_per_class_recall"  # CLIP_benchmark reports it beside top-1 (imbalanced sets)
MEAN_AVERAGE_PRECISION = "mean_average_precision"  # multi-label tasks, as CLIP_benchmark scores them
MEAN_RECALL_AT_1 = "mean_recall@1"  # retrieval: the mean of image→text and text→image recall@1 (DataComp's)
