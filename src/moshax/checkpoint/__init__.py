"""Checkpoints: the Orbax manager of trainer state (``manager``) and model checkpoints users pass around (``model``)."""
