"""Checkpoints: strict safetensors loading by role (frontend or expert shard), the two tensor-name layouts, and
the small random-weight checkpoints ``mixserve tiny-model`` writes."""
