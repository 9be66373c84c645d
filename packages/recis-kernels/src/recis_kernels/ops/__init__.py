"""One module per op family; each exposes plain functions backed by ``torch.ops.recis``."""
