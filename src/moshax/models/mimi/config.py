"""Mimi's typed config: SEANet, transformers, split RVQ. Defaults are the released Mimi."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moshax.config import DTYPES, ConfigError, TransformerConfig, _choice, _positive


@dataclass
class SEANetConfig:
    """SEANet encoder/decoder (the decoder mirrors the encoder; ``ratios`` are in decoder order)."""

    channels: int = 1  # audio channels
    dimension: int = 512  # latent size (= transformer dim)
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: list[int] = field(default_factory=lambda: [8, 6, 5, 4])  # encoder applies them reversed
    kernel_size: int = 7  # first conv
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2  # residual branch width = dim // compress
    true_skip: bool = True  # identity skip (False: a 1x1 conv shortcut)
    pad_mode: str = "constant"  # constant | replicate
    elu_alpha: float = 1.0

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    def validate(self, where: str) -> None:
        for name in ("channels", "dimension", "n_filters", "n_residual_layers", "kernel_size",
                     "last_kernel_size", "residual_kernel_size", "dilation_base", "compress"):
            _positive(f"{where}.{name}", getattr(self, name))
        if not self.ratios or any(r <= 0 for r in self.ratios):
            raise ConfigError(f"{where}.ratios={self.ratios}: expected a non-empty list of positive ints")
        _choice(f"{where}.pad_mode", self.pad_mode, ("constant", "replicate"))
        if self.n_filters % self.compress:
            raise ConfigError(f"{where}.n_filters={self.n_filters} is not divisible by {where}.compress={self.compress}")


@dataclass
class QuantizerConfig:
    """Split residual VQ: ``rvq_first`` (``n_q_semantic`` levels) and ``rvq_rest`` (the others) both
    quantize the same latent; Euclidean EMA codebooks."""

    dimension: int = 256  # codebook dim (1x1 projections from/to the SEANet dimension)
    bins: int = 2048
    n_q: int = 32  # levels stored (trained)
    n_q_semantic: int = 1
    num_codebooks: int = 8  # levels used by encode (run-time setting, <= n_q)
    decay: float = 0.99  # EMA
    epsilon: float = 1e-5
    threshold_usage_ratio: float = 0.1  # dead code: usage < ratio * uniform share
    replaced_usage_ratio: float = 1.0
    check_unused_every: int = 5
    kmeans_iters: int = 50
    q_dropout: bool = False  # training: random number of acoustic levels per step

    def validate(self, where: str) -> None:
        for name in ("dimension", "bins", "n_q", "n_q_semantic", "num_codebooks", "check_unused_every"):
            _positive(f"{where}.{name}", getattr(self, name))
        if self.n_q <= self.n_q_semantic:
            raise ConfigError(f"{where}.n_q={self.n_q} must be larger than {where}.n_q_semantic={self.n_q_semantic}")
        if not self.n_q_semantic <= self.num_codebooks <= self.n_q:
            raise ConfigError(f"{where}.num_codebooks={self.num_codebooks}: expected "
                              f"{self.n_q_semantic} <= num_codebooks <= n_q={self.n_q}")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"{where}.decay={self.decay}: expected 0 <= decay < 1")


def _mimi_transformer() -> TransformerConfig:
    return TransformerConfig(dim=512, num_heads=8, num_layers=8, hidden_dim=2048, gated=False, activation="gelu",
                             norm="layer_norm", norm_eps=1e-5, layer_scale=0.01, context=250, max_period=10000.0,
                             positional="rope", causal=True)


@dataclass
class MimiConfig:
    """Mimi: SEANet encoder -> transformer -> downsample -> split RVQ -> upsample -> transformer -> SEANet decoder."""

    kind: str = "mimi"
    sample_rate: int = 24000
    frame_rate: float = 12.5
    seanet: SEANetConfig = field(default_factory=SEANetConfig)
    transformer: TransformerConfig = field(default_factory=_mimi_transformer)  # encoder and decoder alike
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.seanet.hop_length

    @property
    def downsample_stride(self) -> int:
        return int(round(self.encoder_frame_rate / self.frame_rate))

    @property
    def frame_size(self) -> int:
        """Audio samples per code frame (1920 for the released Mimi)."""
        return int(round(self.sample_rate / self.frame_rate))

    def validate(self, where: str = "model") -> None:
        _positive(f"{where}.sample_rate", self.sample_rate)
        _positive(f"{where}.frame_rate", self.frame_rate)
        _choice(f"{where}.dtype", self.dtype, DTYPES)
        _choice(f"{where}.param_dtype", self.param_dtype, DTYPES)
        self.seanet.validate(f"{where}.seanet")
        self.transformer.validate(f"{where}.transformer")
        self.quantizer.validate(f"{where}.quantizer")
        if self.transformer.dim != self.seanet.dimension:
            raise ConfigError(f"{where}.transformer.dim={self.transformer.dim} must equal "
                              f"{where}.seanet.dimension={self.seanet.dimension}")
        ratio = self.encoder_frame_rate / self.frame_rate
        if abs(ratio - round(ratio)) > 1e-9 or round(ratio) < 1:
            raise ConfigError(f"{where}: sample_rate / prod(seanet.ratios) = {self.encoder_frame_rate} Hz must be an "
                              f"integer multiple of frame_rate={self.frame_rate}")
        if abs(self.sample_rate / self.frame_rate - self.frame_size) > 1e-9:
            raise ConfigError(f"{where}: sample_rate / frame_rate = {self.sample_rate / self.frame_rate} "
                              "is not a whole number of samples")
