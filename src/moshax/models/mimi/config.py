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
        if not self.elu_alpha > 0:  # layers/activations.elu's backward reads the sign of its output
            raise ConfigError(f"{where}.elu_alpha={self.elu_alpha}: expected a positive number")
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


@dataclass
class DiscriminatorConfig:
    """Multi-scale STFT discriminator (EnCodec's MS-STFTD); defaults are EnCodec's (5 scales, 32 filters)."""

    filters: int = 32
    max_filters: int = 1024
    filters_scale: int = 1
    n_ffts: list[int] = field(default_factory=lambda: [1024, 2048, 512, 256, 128])
    hop_lengths: list[int] = field(default_factory=list)  # empty: n_fft // 4
    win_lengths: list[int] = field(default_factory=list)  # empty: n_fft
    kernel_size: list[int] = field(default_factory=lambda: [3, 9])  # (time, freq)
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4])
    stride: list[int] = field(default_factory=lambda: [1, 2])  # (time, freq)
    weight_norm: bool = True
    negative_slope: float = 0.2

    def scales(self) -> list[tuple[int, int, int]]:
        hops = self.hop_lengths or [n // 4 for n in self.n_ffts]
        wins = self.win_lengths or list(self.n_ffts)
        return list(zip(self.n_ffts, hops, wins))

    def min_samples(self) -> int:
        return max(self.n_ffts) if self.n_ffts else 0

    def validate(self, where: str) -> None:
        for name in ("filters", "max_filters", "filters_scale"):
            _positive(f"{where}.{name}", getattr(self, name))
        if not self.n_ffts:
            raise ConfigError(f"{where}.n_ffts is empty: give at least one STFT size")
        for name in ("hop_lengths", "win_lengths"):
            v = getattr(self, name)
            if v and len(v) != len(self.n_ffts):
                raise ConfigError(f"{where}.{name} has {len(v)} entries for {len(self.n_ffts)} n_ffts")
        for n, hop, win in self.scales():
            if n <= 0 or hop <= 0 or not 0 < win <= n:
                raise ConfigError(f"{where}: STFT scale n_fft={n} hop={hop} win={win} is invalid")
        if len(self.kernel_size) != 2 or len(self.stride) != 2 or min(self.kernel_size + self.stride) <= 0:
            raise ConfigError(f"{where}: kernel_size and stride must be two positive ints (time, freq)")
        if any(d <= 0 for d in self.dilations):
            raise ConfigError(f"{where}.dilations={self.dilations}: must be positive")


TEACHER_KINDS = ("none", "npy", "mel", "mimi", "python")


@dataclass
class TeacherConfig:
    """Semantic-distillation teacher: frame features the ``rvq_first`` output learns to match
    (cosine distance after a learnt linear projection).

    * ``none``: no distillation.
    * ``npy``: precomputed features next to each audio file (``clip.wav`` -> ``clip`` + ``suffix``),
      ``[frames, dim]`` at ``frame_rate`` Hz (e.g. WavLM layer features at 50 Hz).
    * ``mel``: log-mel frames at ``frame_rate`` Hz (``n_mels`` bands): a cheap built-in teacher for tests.
    * ``mimi``: a frozen Mimi read from ``path`` (Orbax dir, trainer workdir or Kyutai
      ``.safetensors``): its semantic (``rvq_first``) embedding at its frame rate.
    * ``python``: ``path`` is ``package.module:factory``; ``factory(teacher_cfg, sample_rate)``
      returns an object with ``dim``, ``frame_rate`` and ``__call__(audio [B, 1, T]) -> [B, frames, dim]``
      (a JAX feature extractor loaded from its own checkpoint, for instance).

    Online teachers (mel, mimi, python) run on each process's batch as it is loaded, outside the
    train step; their features are pooled (mean) to the codec frame rate, which must divide
    the teacher's.
    """

    kind: str = "none"
    path: str = ""
    suffix: str = ".npy"
    frame_rate: float = 50.0  # npy and mel
    dim: int = 0  # npy: expected feature size (0: from the files)
    n_mels: int = 64  # mel
    normalize: bool = False  # mel: per-band mean/variance normalization over each crop

    def validate(self, where: str) -> None:
        _choice(f"{where}.kind", self.kind, TEACHER_KINDS)
        if self.kind in ("mimi", "python") and not self.path:
            raise ConfigError(f"{where}.path is empty: teacher kind {self.kind!r} needs a "
                              f"{'checkpoint' if self.kind == 'mimi' else 'module:factory'}")
        if self.kind in ("npy", "mel"):
            _positive(f"{where}.frame_rate", self.frame_rate)
        if self.kind == "mel":
            _positive(f"{where}.n_mels", self.n_mels)
        if self.kind == "python" and ":" not in self.path:
            raise ConfigError(f"{where}.path={self.path!r}: expected package.module:factory")


@dataclass
class MimiTaskConfig:
    """Codec training (the ``task:`` section): losses, discriminator, distillation teacher,
    quantizer dropout, warm start. The audio crops are the ``data:`` section
    (:class:`data_pipeline.configs.AudioDataConfig`).

    The generator loss is ``adversarial_weight * hinge + feature_matching_weight * relative FM +
    commitment_weight * VQ commitment + distill_weight * (1 - cos) [+ l1_weight * L1 + mel_weight *
    multi-scale log-mel L1]``; the discriminator's hinge loss is added (one optimizer: give the
    discriminator its own ``optim.param_groups`` entry, pattern ``^discriminator/``).
    """

    adversarial_weight: float = 1.0
    feature_matching_weight: float = 3.0
    commitment_weight: float = 1.0
    distill_weight: float = 1.0
    l1_weight: float = 0.0  # reconstruction losses: off by default (the paper's best Mimi)
    mel_weight: float = 0.0
    balancer: bool = False  # audiocraft-style gradient balancing of the losses on the decoded audio
    quantize_rate: float = 1.0  # probability (per example) of quantizing; the paper uses 0.5
    quantizer_dropout: bool = False  # a random number of acoustic levels per step
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    init_from: str = ""  # warm start the codec from a Mimi checkpoint (Orbax dir, workdir, .safetensors)

    def validate(self, where: str = "task") -> None:
        for name in ("adversarial_weight", "feature_matching_weight", "commitment_weight", "distill_weight",
                     "l1_weight", "mel_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)}: must be >= 0")
        if not 0.0 <= self.quantize_rate <= 1.0:
            raise ConfigError(f"{where}.quantize_rate={self.quantize_rate}: expected 0 <= rate <= 1")
        self.discriminator.validate(f"{where}.discriminator")
        self.teacher.validate(f"{where}.teacher")


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
