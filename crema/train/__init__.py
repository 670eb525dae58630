"""Training: the pretrain and fine-tune step loops, optimiser groups and schedules, checkpoints,
encoder artifacts, precision and FLOP counting. No Ray, no MLflow: the stage drivers call these."""
