"""Evaluation: checkpoints as agents on held-out tasks (`evaluate`), the metrics and statistics
(`metrics`: success with Wilson intervals, McNemar, teacher-forced KL), the report and plots."""
