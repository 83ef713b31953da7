"""Evaluation stage: metrics and the reports on them (evaluation, calibration, gallery, gradcam, model_card)."""
