"""imgclf trainer: the ML library behind the pipeline (never imports kfp)."""
