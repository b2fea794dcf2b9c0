"""moshax: JAX/TPU pretraining and serving for the Moshi family (Helium, Mimi, the RQ-Transformer)."""

__version__ = "0.1.0"
