"""Mimi neural audio codec (Kyutai): SEANet + transformers + split RVQ, batch and streaming."""

from moshax.models.mimi.config import MimiConfig, QuantizerConfig, SEANetConfig

__all__ = ["MimiConfig", "QuantizerConfig", "SEANetConfig"]
