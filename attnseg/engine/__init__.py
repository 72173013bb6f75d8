"""Training and evaluation engine: Lightning tasks, losses, metrics, optimisers, runner, inference."""
