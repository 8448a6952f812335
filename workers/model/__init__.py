"""The model at the ground: plain PyTorch, no Ray, MLflow or storage (transformer, sampling, LoRA, reward head)."""
