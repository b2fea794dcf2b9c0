"""The Moshi LM's typed configs: the architecture (``model:``) and its training task (``task:``).

No JAX import here: a config loads (and fails, on a mistake) before JAX starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moshax.config import DTYPES, ConfigError, TransformerConfig, _choice, _positive

MOSHIKO_DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]


def _helium_7b_temporal() -> TransformerConfig:
    return TransformerConfig(dim=4096, num_heads=32, num_layers=32, hidden_dim=11264, context=3000)


def _moshi_depformer() -> TransformerConfig:
    return TransformerConfig(dim=1024, num_heads=16, num_layers=6, hidden_dim=2816, context=8, positional="none")


@dataclass
class MoshiAugmentConfig:
    """Training-time augmentations of Moshi's audio pretraining (paper, section 4.4), applied by the
    training task from the step's rng (jit-friendly; eval and inference never apply them).

    * ``text_delay_s``: each example's text stream is shifted against the audio by a random whole
      number of frames, uniform in [-floor(text_delay_s * frame_rate), +floor(...)] (the paper: 0.6 s
      = +-7 frames at 12.5 Hz); positive = text later. Frames shifted in from outside the example
      are the zero token (-1: no input, no loss).
    * ``text_mask_prob``: text positions replaced by the zero token (-1) with this probability
      (paper: 30%); ``text_mask_mode`` "token" draws per position, "example" masks whole examples'
      text streams (audio-only examples)."""

    text_delay_s: float = 0.0
    text_mask_prob: float = 0.0
    text_mask_mode: str = "token"  # token | example

    def validate(self, where: str) -> None:
        if self.text_delay_s < 0:
            raise ConfigError(f"{where}.text_delay_s={self.text_delay_s}: must be >= 0")
        if not 0.0 <= self.text_mask_prob <= 1.0:
            raise ConfigError(f"{where}.text_mask_prob={self.text_mask_prob}: must be in [0, 1]")
        _choice(f"{where}.text_mask_mode", self.text_mask_mode, ("token", "example"))


@dataclass
class MoshiLMConfig:
    """Moshi RQ-Transformer. Defaults are moshiko's (Kyutai ``loaders._lm_kwargs``)."""

    kind: str = "moshi"
    text_card: int = 32000  # text vocab; the text tables have one more row (initial token = text_card)
    card: int = 2048  # audio codebook size; the audio tables have one more row (initial token = card)
    n_q: int = 16  # input audio streams (Moshi's dep_q first, then the user's)
    dep_q: int = 8  # predicted audio codebooks (depth steps = dep_q: text + dep_q - 1 audio inputs)
    delays: list[int] = field(default_factory=lambda: list(MOSHIKO_DELAYS))  # per stream, len n_q + 1
    transformer: TransformerConfig = field(default_factory=_helium_7b_temporal)  # temporal
    depformer: TransformerConfig = field(default_factory=_moshi_depformer)  # depth; context unused
    depformer_weights_per_step: bool = True
    depformer_weights_per_step_schedule: list[int] | None = None  # step -> weight set (sharing)
    depformer_multi_linear: bool = True  # one depformer_in projection per step (else one shared)
    existing_text_padding_id: int = 3  # PAD
    existing_text_end_padding_id: int = 0  # EPAD
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    frame_rate: float = 12.5  # time steps per second (Mimi frames)

    @property
    def num_streams(self) -> int:
        """Streams per frame: text + n_q audio codebooks (17 for Moshi)."""
        return self.n_q + 1

    @property
    def num_depformer_weights(self) -> int:
        if not self.depformer_weights_per_step:
            return 1
        if self.depformer_weights_per_step_schedule:
            return max(self.depformer_weights_per_step_schedule) + 1
        return self.dep_q

    @property
    def num_depformer_in(self) -> int:
        if not self.depformer_multi_linear:
            return 1
        if self.depformer_weights_per_step_schedule:
            return max(self.depformer_weights_per_step_schedule) + 1
        return self.dep_q

    def validate(self, where: str = "model") -> None:
        for name in ("text_card", "card", "n_q", "dep_q"):
            _positive(f"{where}.{name}", getattr(self, name))
        if self.dep_q > self.n_q:
            raise ConfigError(f"{where}.dep_q={self.dep_q} exceeds {where}.n_q={self.n_q}")
        if len(self.delays) != self.n_q + 1:
            raise ConfigError(
                f"{where}.delays has {len(self.delays)} entries, expected n_q + 1 = {self.n_q + 1} (text first)")
        if any(d < 0 for d in self.delays):
            raise ConfigError(f"{where}.delays={self.delays}: delays must be >= 0")
        sched = self.depformer_weights_per_step_schedule
        if sched is not None:
            if len(sched) != self.dep_q:
                raise ConfigError(f"{where}.depformer_weights_per_step_schedule has {len(sched)} entries, "
                                  f"expected dep_q = {self.dep_q}")
            if min(sched) < 0:
                raise ConfigError(f"{where}.depformer_weights_per_step_schedule={sched}: entries must be >= 0")
            if not self.depformer_weights_per_step:
                raise ConfigError(f"{where}.depformer_weights_per_step_schedule needs "
                                  f"{where}.depformer_weights_per_step: true")
        for name in ("existing_text_padding_id", "existing_text_end_padding_id"):
            v = getattr(self, name)
            if not 0 <= v < self.text_card:
                raise ConfigError(f"{where}.{name}={v}: must be in [0, text_card={self.text_card})")
        _choice(f"{where}.dtype", self.dtype, DTYPES)
        _choice(f"{where}.param_dtype", self.param_dtype, DTYPES)
        _positive(f"{where}.frame_rate", self.frame_rate)
        self.transformer.validate(f"{where}.transformer")
        self.depformer.validate(f"{where}.depformer")
        if not self.depformer.gated:
            raise ConfigError(f"{where}.depformer.gated=false: the depformer needs a gated MLP")


@dataclass
class MoshiTaskConfig:
    """Training the Moshi LM: moshi-finetune's loss weights, pretraining augmentations, warm start.

    ``init_from`` names a moshax checkpoint (a trainer workdir, its ``checkpoints/`` dir, or a
    ``moshax convert`` output): a Helium checkpoint fills the text embedding, temporal
    transformer, out_norm and text head; a Moshi LM checkpoint fills every param."""

    text_padding_weight: float = 0.5  # PAD/EPAD text targets
    semantic_weight: float = 100.0  # the semantic codebook (paper)
    acoustic_weight: float = 1.0
    augment: MoshiAugmentConfig = field(default_factory=MoshiAugmentConfig)
    init_from: str = ""

    def validate(self, where: str = "task") -> None:
        for name in ("text_padding_weight", "semantic_weight", "acoustic_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)}: must be >= 0")
        self.augment.validate(f"{where}.augment")
