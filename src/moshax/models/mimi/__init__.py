"""Mimi neural audio codec (Kyutai): SEANet + transformers + split RVQ, batch and streaming;
training configs (discriminator, distillation teacher)."""

from moshax.models.mimi.config import (
    DiscriminatorConfig, MimiConfig, MimiTaskConfig, QuantizerConfig, SEANetConfig, TeacherConfig)

__all__ = ["DiscriminatorConfig", "MimiConfig", "MimiTaskConfig", "QuantizerConfig", "SEANetConfig", "TeacherConfig"]
