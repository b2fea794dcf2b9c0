"""Mimi codec training task: generator (the codec) + MS-STFT discriminator with the shared trainer.

One train step is one optimizer update of every parameter (simultaneous GAN updates):

    loss = G_loss(codec params; discriminator params under stop_gradient)
         + D_loss(discriminator params; decoded audio under stop_gradient)

so each half only moves its own parameters. Give the discriminator its own param group
(``optim.param_groups: [{pattern: "^discriminator/", learning_rate: ...}]``).

``G_loss = adversarial_weight * hinge + feature_matching_weight * relative FM +
commitment_weight * VQ commitment + distill_weight * (1 - cos(proj(semantic), teacher))
[+ l1_weight * L1 + mel_weight * multi-scale log-mel L1]``; ``D_loss`` is the hinge loss on real
vs decoded crops. EMA codebook updates, k-means init and dead-code replacement happen inside the
loss (non-Param variables the trainer keeps), quantizer dropout per ``task.quantizer_dropout``.
The losses, discriminator and teacher are the ``task:`` section
(:class:`moshax.models.mimi.config.MimiTaskConfig`), the audio crops the ``data:`` section.
With ``task.balancer`` the losses on the decoded audio (adversarial, feature matching, L1,
mel) are combined with audiocraft's gradient balancer instead of plain weights.

The trainer's model is :class:`MimiForTraining`: a :class:`Mimi` with two more attributes,
``discriminator`` and ``distill_proj``, so its checkpoints read as plain Mimi checkpoints
(``moshax mimi``, ``moshax convert to-kyutai``; the extra entries are ignored).
Reported metrics: ``loss`` (G + D), ``g_loss``, ``d_loss``, ``adversarial``, ``feature_matching``,
``commitment``, ``distillation``, ``l1`` (when weighted), ``mel_distance`` (the mel loss, weighted
or not), ``si_sdr``, ``rvq_entropy``,
``rvq_expired``, ``n_q``; throughput is ``audio_seconds_per_second`` (no tokens, no perplexity:
the losses are not token cross-entropies).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moshax.config import Config, ConfigError
from moshax.layers.params import normal, param
from moshax.models.mimi import losses as L
from moshax.models.mimi.discriminator import MultiScaleSTFTDiscriminator
from moshax.models.mimi.model import Mimi
from moshax.training.metrics import stack_matmul_params, training_flops_per_token
from moshax.training.mimi_teacher import pool_to_rate
from moshax.training.task import Task


class TrainCounter(nnx.Variable):
    """Forward passes seen (schedules the quantizer's dead-code checks); not a Param."""


class MimiForTraining(Mimi):
    """The codec plus what only training needs: the discriminator and the distillation projection."""

    def __init__(self, cfg, discriminator, *, teacher_dim: int = 0, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.discriminator = MultiScaleSTFTDiscriminator(discriminator, in_channels=cfg.seanet.channels,
                                                         dtype=self.dtype, rngs=rngs)
        dim = cfg.seanet.dimension
        self.distill_proj = (param(rngs, normal(dim ** -0.5), (dim, teacher_dim), ("embed", None))
                             if teacher_dim else None)
        self.forward_count = TrainCounter(jnp.zeros((), jnp.int32))


def _frozen(module):
    """The same module with every variable under stop_gradient (for the generator's view of D)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))


class MimiTask(Task):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.tc = cfg.task
        from data_pipeline.audio_loader import crop_samples

        m = self.model_cfg
        self.num_samples = crop_samples(self.data_cfg.crop_seconds, m.sample_rate, m.frame_size)
        if self.num_samples < self.tc.discriminator.min_samples():
            raise ConfigError(f"data.crop_seconds={self.data_cfg.crop_seconds}: crops of {self.num_samples} samples "
                              f"are shorter than the largest discriminator n_fft {self.tc.discriminator.min_samples()}")
        self.frames = self.num_samples // m.frame_size
        t = self.tc.teacher
        self._teacher = None
        self.teacher_dim, self.teacher_rate = 0, 0.0
        if t.kind == "npy":
            self.teacher_dim, self.teacher_rate = t.dim, t.frame_rate
            if not self.teacher_dim:
                self.teacher_dim = self._npy_dim()
        elif t.kind != "none":
            from moshax.training.mimi_teacher import build_teacher

            self._teacher = build_teacher(t, m.sample_rate)
            self.teacher_dim, self.teacher_rate = int(self._teacher.dim), float(self._teacher.frame_rate)
        if self.teacher_dim:
            from moshax.training.mimi_teacher import teacher_frames

            self.teacher_frames = teacher_frames(self.num_samples, m.sample_rate, self.teacher_rate)
            pool_to_rate(jnp.zeros((1, self.teacher_frames, 1)), self.teacher_rate, m.frame_rate)  # checks the ratio

    def _npy_dim(self) -> int:
        from data_pipeline.audio import list_audio_files
        from data_pipeline.audio_loader import features_path

        sources = self.data_cfg.train_sources
        if not sources:
            return 0
        first = features_path(list_audio_files(sources)[0], self.tc.teacher.suffix)
        try:
            return int(np.load(first, mmap_mode="r").shape[-1])
        except (OSError, ValueError) as e:
            from data_pipeline.errors import DataError

            raise DataError(f"{first}: cannot read teacher features ({str(e).splitlines()[0]})") from None

    # ----------------------------------------------------------------------------- model

    def build_model(self, rngs: nnx.Rngs) -> MimiForTraining:
        return MimiForTraining(self.model_cfg, self.tc.discriminator, teacher_dim=self.teacher_dim, rngs=rngs)

    def init_params(self, params: dict, rest: dict, trainer):
        """Warm start the codec from ``task.init_from`` (the discriminator stays fresh)."""
        if not self.tc.init_from:
            return params, rest
        from moshax.checkpoint.model import load_codec

        codec = load_codec(self.tc.init_from)
        _, p, r = nnx.split(codec, nnx.Param, ...)
        loaded_p, loaded_r = nnx.to_pure_dict(p), nnx.to_pure_dict(r)

        def put(dst, src, where):
            for k, v in src.items():
                if k not in dst:
                    raise ConfigError(f"task.init_from={self.tc.init_from}: unexpected entry {where}{k}")
                if isinstance(v, dict):
                    put(dst[k], v, f"{where}{k}/")
                else:
                    if tuple(dst[k].shape) != tuple(v.shape):
                        raise ConfigError(f"task.init_from={self.tc.init_from}: {where}{k} has shape "
                                          f"{tuple(v.shape)}, the model {tuple(dst[k].shape)}")
                    dst[k] = jax.device_put(jnp.asarray(v, dst[k].dtype), dst[k].sharding)

        put(params, loaded_p, "")
        put(rest, loaded_r, "")
        self.say(f"warm start (task.init_from): the codec from {self.tc.init_from}; the discriminator starts fresh")
        return params, rest

    # ----------------------------------------------------------------------------- data

    def example_spec(self) -> dict:
        spec = {"audio": ((self.model_cfg.seanet.channels, self.num_samples), np.float32)}
        if self.teacher_dim:
            spec["teacher"] = ((self.teacher_frames, self.teacher_dim), np.float32)
        return spec

    def batch_axes(self) -> dict:
        return {"audio": ("act_batch", None, None), "teacher": ("act_batch", None, None)}

    def data_iterator(self, split: str, *, global_batch_size: int, process_index: int, process_count: int):
        from data_pipeline.audio_loader import Features, make_audio_iterator

        t = self.tc.teacher
        features = Features(t.suffix, t.frame_rate, t.dim) if t.kind == "npy" else None
        m = self.model_cfg
        it = make_audio_iterator(self.data_cfg, split=split, global_batch_size=global_batch_size,
                                 seed=self.cfg.seed, sample_rate=m.sample_rate, frame_size=m.frame_size,
                                 process_index=process_index, process_count=process_count, features=features)
        if it is not None and self._teacher is not None:
            from moshax.training.mimi_teacher import TeacherIterator

            it = TeacherIterator(it, self._teacher, self.teacher_frames)
        return it

    def check_inputs(self) -> None:
        from data_pipeline.audio_loader import build_index

        a = self.data_cfg
        if not a.train_sources:
            raise ConfigError("data.train_sources is empty: name audio dirs, globs, files or .jsonl manifests")
        t = self.tc.teacher
        from data_pipeline.audio_loader import Features

        build_index(a.train_sources, features=Features(t.suffix, t.frame_rate, t.dim) if t.kind == "npy" else None)

    # ----------------------------------------------------------------------------- loss

    def loss(self, model: MimiForTraining, batch: dict, rng):
        """Generator + discriminator loss of one batch (summed over examples) and the metrics;
        ``rng`` None means evaluation: every crop quantized with every level, no statistics
        updated."""
        tc = self.tc
        audio = batch["audio"].astype(jnp.float32)
        b = audio.shape[0]
        step = model.forward_count[...]
        if rng is None:
            out = model.train_forward(audio, jax.random.key(0), step=step, quantize_rate=1.0, update_stats=False,
                                      dropout=False)
        else:
            model.forward_count[...] = step + 1
            out = model.train_forward(audio, rng, step=step, quantize_rate=tc.quantize_rate,
                                      dropout=tc.quantizer_dropout)
        fake = out.audio.astype(jnp.float32)

        # discriminator on real and (stopped) decoded audio, in one pass
        disc = model.discriminator
        logits, fmaps = disc(jnp.concatenate([audio, jax.lax.stop_gradient(fake)], axis=0))
        logits_real = [lg[:b] for lg in logits]
        logits_fake_d = [lg[b:] for lg in logits]
        fmaps_real = [[f[:b] for f in scale] for scale in fmaps]
        d_loss = L.hinge_discriminator_loss(logits_real, logits_fake_d)  # [B]

        frozen = _frozen(disc)

        def adversarial(x):
            return L.hinge_generator_loss(frozen(x)[0])

        def feature_matching(x):
            return L.feature_matching_loss(fmaps_real, frozen(x)[1])

        sr = self.model_cfg.sample_rate
        audio_losses = {"adversarial": (tc.adversarial_weight, adversarial),
                        "feature_matching": (tc.feature_matching_weight, feature_matching),
                        "l1": (tc.l1_weight, lambda x: L.l1_loss(x, audio)),
                        "mel_distance": (tc.mel_weight, lambda x: L.mel_loss(x, audio, sr))}
        aux = {}
        if tc.balancer:
            active = {k: (lambda x, f=f: jnp.mean(f(x))) for k, (w, f) in audio_losses.items() if w > 0}
            weights = {k: w for k, (w, _) in audio_losses.items() if w > 0}
            surrogate, values, norms = L.balanced_surrogate(active, weights, fake)
            g_audio = surrogate * b  # per-example scale: the trainer divides by the batch size
            for k, v in values.items():
                aux[k] = (v * b, b)
                aux[f"grad_norm_{k}"] = (norms[k] * b, b)
            g_audio_report = sum(weights[k] * values[k] for k in values) * b
        else:
            logits_fake, fmaps_fake = frozen(fake)  # one pass for both adversarial losses
            values = {"adversarial": L.hinge_generator_loss(logits_fake),
                      "feature_matching": L.feature_matching_loss(fmaps_real, fmaps_fake)}
            g_audio = 0.0
            for k, (w, f) in audio_losses.items():
                if w > 0 or k in values:
                    v = jnp.sum(values[k] if k in values else f(fake))
                    aux[k] = (v, b)
                    if w > 0:
                        g_audio = g_audio + w * v
            g_audio_report = g_audio

        commit = out.penalty * b
        g_loss = g_audio + tc.commitment_weight * commit
        g_report = g_audio_report + tc.commitment_weight * commit
        aux["commitment"] = (commit, b)
        if self.teacher_dim:
            teacher = pool_to_rate(batch["teacher"].astype(jnp.float32), self.teacher_rate, self.model_cfg.frame_rate)
            pred = jnp.einsum("btd,de->bte", out.semantic.astype(jnp.float32),
                              model.distill_proj[...].astype(jnp.float32))
            n = min(pred.shape[1], teacher.shape[1])
            distill = jnp.sum(L.cosine_distance(pred[:, :n], jax.lax.stop_gradient(teacher[:, :n])))
            g_loss = g_loss + tc.distill_weight * distill
            g_report = g_report + tc.distill_weight * distill
            aux["distillation"] = (distill, b)
        d_sum = jnp.sum(d_loss)
        aux["d_loss"] = (d_sum, b)
        aux["g_loss"] = (g_report, b)
        sg_fake = jax.lax.stop_gradient(fake)
        if "mel_distance" not in aux:
            aux["mel_distance"] = (jnp.sum(L.mel_loss(sg_fake, audio, sr)), b)
        aux["si_sdr"] = (jnp.sum(L.si_sdr(audio, sg_fake)), b)
        for k, v in out.metrics.items():
            aux[k] = (v * b, b)
        return g_loss + d_sum, jnp.asarray(b, jnp.float32), aux

    # ----------------------------------------------------------------------------- accounting

    def flops_per_example(self) -> float:
        """Rough training FLOPs per crop: the encoder and decoder transformers per 25 Hz position
        (the one formula, :func:`training_flops_per_token`) + 6 x SEANet MACs — for MFU only."""
        m = self.model_cfg
        t = m.transformer
        pos = self.num_samples // m.seanet.hop_length
        per_tok = training_flops_per_token(2 * stack_matmul_params(t), ((2 * t.num_layers, t.dim, t.context),))
        return float(per_tok * pos + 6 * _seanet_macs(m, self.num_samples) * 2)

    def tokens_per_example(self) -> int:
        return self.frames

    def throughput(self) -> tuple[str, float]:
        return "audio_seconds_per_second", self.num_samples / self.model_cfg.sample_rate


def _seanet_macs(m, samples: int) -> float:
    """Multiply-accumulates of SEANet encoder + decoder convs for ``samples`` of audio."""
    s = m.seanet
    total = 0.0
    length, ch = samples, s.n_filters
    total += length * s.channels * ch * s.kernel_size
    for r in reversed(s.ratios):
        hidden = ch // s.compress
        total += s.n_residual_layers * length * (ch * hidden * s.residual_kernel_size + hidden * ch)
        length //= r
        total += length * ch * 2 * ch * 2 * r
        ch *= 2
    total += length * ch * s.dimension * s.last_kernel_size
    return 2 * total  # the decoder mirrors the encoder
