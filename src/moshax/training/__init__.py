"""Training: optimizer, losses, checkpointing, metrics and the generic trainer loop."""
