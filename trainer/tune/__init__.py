"""Tuning stage: the hyperparameter search and its report (tuning, search_space, katib, tuning_report)."""
