"""The training loop shared by every training kind (Ray Train workers, DDP on gloo or NCCL)."""
