"""Mimi's split residual vector quantizer: inference (encode/decode) and training-side pieces.

``rvq_first`` (the semantic level(s)) and ``rvq_rest`` (acoustic levels) each project the **same**
latent ``[B, T, 512]`` with a 1x1 ``input_proj`` (no bias) to the codebook dim, quantize it
residually level by level against Euclidean codebooks, and project back with ``output_proj``; the
two outputs are summed.

Codebooks are EMA statistics, stored like Kyutai's buffers as non-``Param`` variables
(:class:`CodebookBuffer`, so an optimizer over ``nnx.Param`` never touches them), stacked over levels:
``embedding_sum [L, bins, dim]``, ``cluster_usage [L, bins]``, ``initialized [L]``; the codebook
is ``embedding_sum / max(cluster_usage, epsilon)``.

Training side (pure functions over :class:`CodebookStats`, as Kyutai's ``core_vq`` in train mode):
:func:`rvq_train` runs per level: k-means init of a level once the previous level is initialized
(:func:`kmeans`), nearest codes, dead-code replacement on check steps (:func:`replace_dead_codes`),
EMA update of the statistics (:func:`ema_update`), the commitment loss ``mse(residual, sg(q))``,
and a straight-through output ``z + sg(q - z)``. :meth:`SplitResidualVQ.train_forward` adds the
projections, quantizer dropout and the split renormalisation of the penalty. Statistics are
computed over the global batch (under ``jit`` on a mesh that is the all-reduce Kyutai does by hand).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moshax.layers.params import normal, param
from moshax.models.mimi.config import QuantizerConfig

HIGHEST = jax.lax.Precision.HIGHEST


class CodebookBuffer(nnx.Variable):
    """EMA codebook statistics (``embedding_sum``, ``cluster_usage``, ``initialized``): not a Param."""


def codebook_from_stats(embedding_sum, cluster_usage, epsilon: float):
    """Centroids ``[..., bins, dim]`` from the EMA statistics."""
    return embedding_sum / jnp.maximum(cluster_usage, epsilon)[..., None]


def nearest_code(x, codebook):
    """Index of the nearest centroid (Euclidean): x [N, D], codebook [bins, D] -> [N] int32."""
    x = x.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    dots = jnp.einsum("nd,kd->nk", x, codebook, precision=HIGHEST)
    dist = jnp.sum(jnp.square(codebook), axis=-1)[None, :] - 2.0 * dots  # + |x|^2, same argmin
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def rvq_encode(z, codebooks):
    """Residual quantization of z [N, D] with codebooks [L, bins, D] -> (codes [L, N], quantized [N, D])."""

    def level(residual, cb):
        codes = nearest_code(residual, cb)
        q = jnp.take(cb, codes, axis=0)
        return residual - q, codes

    residual, codes = jax.lax.scan(level, z.astype(jnp.float32), codebooks)
    return codes, z - residual


# ---------------------------------------------------------------------------------- training side


class CodebookStats(NamedTuple):
    """EMA statistics of ``L`` codebook levels: ``embedding_sum [L, K, D]``, ``cluster_usage [L, K]``,
    ``initialized [L]`` (1.0 once k-means ran)."""

    embedding_sum: jax.Array
    cluster_usage: jax.Array
    initialized: jax.Array


def sample_vectors(key, samples, num: int):
    """``num`` rows of samples [N, D]: without replacement when N >= num, else with."""
    n = samples.shape[0]
    if n >= num:
        idx = jax.random.permutation(key, n)[:num]
    else:
        idx = jax.random.randint(key, (num,), 0, n)
    return jnp.take(samples, idx, axis=0)


def kmeans(key, samples, num_clusters: int, num_iters: int = 50):
    """Lloyd's k-means on samples [N, D]; empty clusters are re-seeded with random samples.
    Returns (means [K, D], counts [K] float32, clamped to >= 1), as Kyutai's ``_run_kmeans``."""
    samples = samples.astype(jnp.float32)
    key, k0 = jax.random.split(key)
    means = sample_vectors(k0, samples, num_clusters)

    def body(carry, k):
        means, _ = carry
        codes = nearest_code(samples, means)
        bins = jnp.bincount(codes, length=num_clusters)
        empty = bins == 0
        bins = jnp.maximum(bins, 1).astype(jnp.float32)
        new = jax.ops.segment_sum(samples, codes, num_segments=num_clusters) / bins[:, None]
        means = jnp.where(empty[:, None], sample_vectors(k, samples, num_clusters), new)
        return (means, bins), None

    (means, bins), _ = jax.lax.scan(body, (means, jnp.ones((num_clusters,), jnp.float32)),
                                    jax.random.split(key, num_iters))
    return means, bins


def ema_update(embedding_sum, cluster_usage, samples, codes, decay: float, weight=1.0):
    """One EMA step of one level's statistics with samples [N, D] assigned to codes [N].
    ``weight`` (scalar 0/1) turns the update off (an inactive level)."""
    k = cluster_usage.shape[0]
    counts = jnp.bincount(codes, length=k).astype(jnp.float32)
    sums = jax.ops.segment_sum(samples.astype(jnp.float32), codes, num_segments=k)
    rate = (1.0 - decay) * weight
    return embedding_sum + rate * (sums - embedding_sum), cluster_usage + rate * (counts - cluster_usage)


def replace_dead_codes(key, embedding_sum, cluster_usage, samples, *, threshold_usage_ratio: float,
                       replaced_usage_ratio: float):
    """Codes whose usage is below ``threshold_usage_ratio`` x the uniform share are re-seeded with
    random batch samples and usage ``replaced_usage_ratio`` x the uniform share.
    Returns (embedding_sum, cluster_usage, fraction of codes replaced)."""
    k = cluster_usage.shape[0]
    share = jnp.sum(cluster_usage) / k
    expired = cluster_usage < threshold_usage_ratio * share
    new_usage = replaced_usage_ratio * share
    new_vectors = sample_vectors(key, samples.astype(jnp.float32), k)
    embedding_sum = jnp.where(expired[:, None], new_usage * new_vectors, embedding_sum)
    cluster_usage = jnp.where(expired, new_usage, cluster_usage)
    return embedding_sum, cluster_usage, jnp.mean(expired.astype(jnp.float32))


class RVQTrainOutput(NamedTuple):
    quantized: jax.Array  # [N, D] straight-through: forward = sum of active levels' centroids
    codes: jax.Array  # [L, N] int32 (levels >= n_active: computed, not used)
    commit_loss: jax.Array  # scalar: mean over active levels of mse(residual, sg(q))
    stats: CodebookStats
    metrics: dict


def rvq_train(stats: CodebookStats, z, key, *, cfg: QuantizerConfig, n_active=None, check_dead=False):
    """Training forward of one residual VQ branch on z [N, D] (pure).

    Per level (as Kyutai's ``ResidualVectorQuantization.forward`` in train mode): k-means init if
    this level is not initialized and the previous level was (before this step); nearest codes with
    the current codebook; on ``check_dead`` steps (Kyutai: every ``check_unused_every`` steps),
    dead-code replacement; EMA update; commitment loss. ``n_active`` (traced int, default all)
    levels are used (quantizer dropout): the others neither add to the output nor learn.
    """
    num_levels = stats.embedding_sum.shape[0]
    n_active = num_levels if n_active is None else n_active
    check_dead = jnp.asarray(check_dead)
    z = z.astype(jnp.float32)

    def level(carry, xs):
        residual, prev_initialized, q_sum = carry
        es, cu, initialized, k, idx = xs
        active = idx < n_active
        k_init, k_dead = jax.random.split(k)

        def init(_):
            means, bins = kmeans(k_init, jax.lax.stop_gradient(residual), cu.shape[0], cfg.kmeans_iters)
            return means * bins[:, None], bins, jnp.ones_like(initialized)

        do_init = active & (prev_initialized > 0) & (initialized == 0)
        es, cu, now_initialized = jax.lax.cond(do_init, init, lambda _: (es, cu, initialized), None)
        x = jax.lax.stop_gradient(residual)
        codebook = codebook_from_stats(es, cu, cfg.epsilon)
        codes = nearest_code(x, codebook)
        q = jnp.take(codebook, codes, axis=0)

        def dead(_):
            return replace_dead_codes(k_dead, es, cu, x, threshold_usage_ratio=cfg.threshold_usage_ratio,
                                      replaced_usage_ratio=cfg.replaced_usage_ratio)

        es2, cu2, expired = jax.lax.cond(active & check_dead & (now_initialized > 0), dead,
                                         lambda _: (es, cu, jnp.zeros((), jnp.float32)), None)
        es2, cu2 = ema_update(es2, cu2, x, codes, cfg.decay, active.astype(jnp.float32))
        loss = jnp.mean(jnp.square(residual - jax.lax.stop_gradient(q)))
        keep = active.astype(jnp.float32)
        q = q * keep
        carry = (residual - q, initialized, q_sum + q)  # gradient flows to z through every residual
        p = cu2 / jnp.sum(cu2)
        entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0)) / jnp.log(cu2.shape[0])
        return carry, (es2, cu2, now_initialized, codes, loss * keep, expired * keep, entropy * keep)

    keys = jax.random.split(key, num_levels)
    carry0 = (z, jnp.ones((), stats.initialized.dtype), jnp.zeros_like(z))
    (_, _, q_sum), (es, cu, inited, codes, losses, expired, entropy) = jax.lax.scan(
        level, carry0, (stats.embedding_sum, stats.cluster_usage, stats.initialized, keys,
                        jnp.arange(num_levels)))
    n = jnp.asarray(n_active, jnp.float32)
    quantized = z + jax.lax.stop_gradient(q_sum - z)  # straight-through
    metrics = {"rvq_expired": jnp.sum(expired) / n, "rvq_entropy": jnp.sum(entropy) / n}
    return RVQTrainOutput(quantized, codes, jnp.sum(losses) / n, CodebookStats(es, cu, inited), metrics)


class QuantizerTrainOutput(NamedTuple):
    quantized: jax.Array  # [B, T, D] straight-through, both branches summed
    codes: jax.Array  # [B, num_codebooks, T]
    penalty: jax.Array  # commitment loss, renormalised over the levels used
    metrics: dict
    semantic: jax.Array  # [B, T, D] the rvq_first branch alone (distillation target)


class ResidualVQ(nnx.Module):
    """One RVQ branch: 1x1 in-projection, ``n_levels`` residual Euclidean codebooks, 1x1 out-projection."""

    def __init__(self, input_dim: int, cfg: QuantizerConfig, n_levels: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.n_levels = n_levels
        self.epsilon = cfg.epsilon
        self.dtype = dtype
        self.input_proj = param(rngs, normal(input_dim ** -0.5), (input_dim, cfg.dimension),
                                ("embed", "codebook_dim"), param_dtype)
        self.output_proj = param(rngs, normal(cfg.dimension ** -0.5), (cfg.dimension, input_dim),
                                 ("codebook_dim", "embed"), param_dtype)
        self.embedding_sum = CodebookBuffer(jnp.zeros((n_levels, cfg.bins, cfg.dimension), jnp.float32),
                                            axes=("codebooks", "codebook_bins", "codebook_dim"))
        self.cluster_usage = CodebookBuffer(jnp.ones((n_levels, cfg.bins), jnp.float32),
                                            axes=("codebooks", "codebook_bins"))
        self.initialized = CodebookBuffer(jnp.zeros((n_levels,), jnp.float32), axes=("codebooks",))
        self.centroids = None  # inference layout (inference_layout): one array per level

    def inference_layout(self) -> None:
        """Inference layout (:class:`moshax.inference.bound.BoundModel` calls it, eagerly, on its own
        copy): the centroids computed once, one array per level. ``encode``/``decode`` then skip
        the per-call division of the EMA sums (all levels: 15 MB per streamed frame for Mimi's
        acoustic branch) and run the levels as a Python loop (no scan slicing a copy of each
        codebook). Same math, same codes. Training and checkpoints keep the EMA statistics."""
        if self.centroids is None:
            cbs = self.codebooks()
            self.centroids = nnx.data(nnx.List([CodebookBuffer(cbs[i]) for i in range(self.n_levels)]))

    def _centroid_list(self, n: int) -> list:
        if self.centroids is not None:
            return [c[...] for c in list(self.centroids)[:n]]
        cbs = self.codebooks(n)
        return [cbs[i] for i in range(n)]

    def stats(self) -> CodebookStats:
        return CodebookStats(self.embedding_sum[...], self.cluster_usage[...], self.initialized[...])

    def set_stats(self, stats: CodebookStats) -> None:
        """Write the statistics of the first ``len(stats)`` levels (the others are kept)."""
        n = stats.initialized.shape[0]
        for var, new in ((self.embedding_sum, stats.embedding_sum), (self.cluster_usage, stats.cluster_usage),
                         (self.initialized, stats.initialized)):
            var[...] = new if n == var.shape[0] else var[...].at[:n].set(new)

    def codebooks(self, n: int | None = None):
        """Centroids of the first ``n`` levels, [n, bins, dim] float32."""
        n = self.n_levels if n is None else n
        return codebook_from_stats(self.embedding_sum[...][:n], self.cluster_usage[...][:n], self.epsilon)

    def project_in(self, x):
        return jnp.einsum("btc,cd->btd", x.astype(jnp.float32), self.input_proj[...].astype(jnp.float32),
                          precision=HIGHEST)

    def project_out(self, q):
        return jnp.einsum("btd,dc->btc", q.astype(jnp.float32), self.output_proj[...].astype(jnp.float32),
                          precision=HIGHEST)

    def encode(self, x, n: int | None = None):
        """x [B, T, input_dim] -> codes [B, n, T] int32 (n defaults to all levels)."""
        n = self.n_levels if n is None else n
        b, t, _ = x.shape
        if n == 0:
            return jnp.zeros((b, 0, t), jnp.int32)
        z = self.project_in(x).reshape(b * t, -1)
        if self.centroids is None:
            codes, _ = rvq_encode(z, self.codebooks(n))
        else:  # the levels unrolled over per-level arrays (as rvq_encode's scan body)
            residual, out = z.astype(jnp.float32), []
            for cb in self._centroid_list(n):
                out.append(nearest_code(residual, cb))
                residual = residual - jnp.take(cb, out[-1], axis=0)
            codes = jnp.stack(out)
        return codes.reshape(n, b, t).transpose(1, 0, 2)

    def decode(self, codes):
        """codes [B, n, T] -> [B, T, input_dim] float32 (sum of the n levels' centroids, projected)."""
        n = codes.shape[1]
        cbs = self._centroid_list(n)
        q = sum(jnp.take(cbs[i], codes[:, i], axis=0) for i in range(n))  # [B, T, dim]
        return self.project_out(q)


class SplitResidualVQ(nnx.Module):
    """``rvq_first`` (semantic) and ``rvq_rest`` (acoustic) on the same latent; outputs summed."""

    def __init__(self, input_dim: int, cfg: QuantizerConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.n_q_semantic = cfg.n_q_semantic
        self.num_codebooks = cfg.num_codebooks
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.rvq_first = ResidualVQ(input_dim, cfg, cfg.n_q_semantic, **kw)
        self.rvq_rest = ResidualVQ(input_dim, cfg, cfg.n_q - cfg.n_q_semantic, **kw)

    def encode(self, x, num_codebooks: int | None = None):
        """Latent x [B, T, D] -> codes [B, K, T] int32, K = num_codebooks (default: the config's)."""
        k = self.num_codebooks if num_codebooks is None else num_codebooks
        if not self.n_q_semantic <= k <= self.cfg.n_q:
            raise ValueError(f"num_codebooks={k}: expected {self.n_q_semantic}..{self.cfg.n_q}")
        codes = self.rvq_first.encode(x)
        if k > self.n_q_semantic:
            codes = jnp.concatenate([codes, self.rvq_rest.encode(x, k - self.n_q_semantic)], axis=1)
        return codes

    def decode(self, codes):
        """codes [B, K, T] -> latent [B, T, D] float32."""
        if codes.shape[1] > self.cfg.n_q or codes.shape[1] < self.n_q_semantic:
            raise ValueError(f"codes have {codes.shape[1]} codebooks; expected {self.n_q_semantic}..{self.cfg.n_q}")
        out = self.rvq_first.decode(codes[:, : self.n_q_semantic])
        if codes.shape[1] > self.n_q_semantic:
            out = out + self.rvq_rest.decode(codes[:, self.n_q_semantic:])
        return out

    def train_forward(self, x, key, *, step=0, update_stats: bool = True, dropout: bool = False):
        """Training forward on the latent x [B, T, D]: returns
        ``(quantized [B, T, D] straight-through, codes [B, K, T], penalty, metrics)`` and, when
        ``update_stats``, writes the new EMA statistics into the codebook buffers (pure under
        ``nnx.jit``; the buffers are not Params, so optimizers leave them alone).

        ``step`` (int, may be traced) schedules dead-code checks every ``check_unused_every`` steps.
        The penalty is the per-branch commitment loss renormalised by the levels used, as Kyutai's.
        """
        out = self.train_forward_parts(x, key, step=step, update_stats=update_stats, dropout=dropout)
        return out.quantized, out.codes, out.penalty, out.metrics

    def train_forward_parts(self, x, key, *, step=0, update_stats: bool = True,
                            dropout: bool = False) -> "QuantizerTrainOutput":
        """:meth:`train_forward`, also giving ``semantic``: the ``rvq_first`` branch's projected
        (straight-through) output [B, T, D], the target of semantic distillation. ``dropout=True``
        (quantizer dropout, a training setting: ``task.quantizer_dropout``) uses a random number
        (1..levels) of acoustic levels.

        Only the ``num_codebooks`` levels in use are trained (as Kyutai's, whose training forward
        runs its run-time ``n_q``): the released Mimi has 32 levels and uses 8."""
        cfg = self.cfg
        b, t, _ = x.shape
        k_first, k_rest, k_drop = jax.random.split(key, 3)
        n_rest = cfg.num_codebooks - cfg.n_q_semantic
        n_active = jax.random.randint(k_drop, (), 1, n_rest + 1) if dropout else n_rest
        check = (jnp.asarray(step) % cfg.check_unused_every) == cfg.check_unused_every - 1
        outs = []
        for branch, k, n in ((self.rvq_first, k_first, None), (self.rvq_rest, k_rest, n_active)):
            z = branch.project_in(x).reshape(b * t, -1)
            stats = branch.stats()
            if n is not None:
                stats = jax.tree.map(lambda a: a[:n_rest], stats)
            out = rvq_train(stats, z, k, cfg=cfg, n_active=n, check_dead=check)
            if update_stats:
                branch.set_stats(out.stats)
            outs.append(out)
        first, rest = outs
        semantic = self.rvq_first.project_out(first.quantized.reshape(b, t, -1))
        quantized = semantic + self.rvq_rest.project_out(rest.quantized.reshape(b, t, -1))
        codes = jnp.concatenate([first.codes, rest.codes], axis=0).reshape(cfg.num_codebooks, b, t).transpose(1, 0, 2)
        ns = float(cfg.n_q_semantic)
        na = jnp.asarray(n_active, jnp.float32)
        total = ns + na
        penalty = first.commit_loss * ns / total + rest.commit_loss * na / total
        metrics = {k: first.metrics[k] * ns / total + rest.metrics[k] * na / total for k in first.metrics}
        metrics["n_q"] = total
        return QuantizerTrainOutput(quantized, codes, penalty, metrics, semantic)
