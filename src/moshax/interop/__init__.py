"""Converters between Kyutai's released checkpoints (safetensors) and moshax params, both directions."""
