"""Training stage: build, train, checkpoint and export the model (model, training, checkpoints, export, tflite)."""
