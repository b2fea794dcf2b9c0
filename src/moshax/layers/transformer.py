"""Pre-norm transformer block and a stack of them, created with ``nnx.vmap`` and run with a scan.

The block is the one copy of the layer math for Helium, Moshi's temporal and depth transformers
and Mimi: the depth transformer builds it with per-step projection weights and a weight selector
(see :mod:`moshax.layers.linear` and :mod:`moshax.models.depformer`).

Compile time does not grow with depth (one traced layer); the remat policy is a config value.
The KV caches of all layers are one stacked :class:`KVCache` scanned alongside the weights. On a
CPU the scan of big layers is unrolled by default (``layer_loop``, see :func:`unrolls`): same
arrays, same math, static slices instead of XLA:CPU's per-layer copies.

Inference layout: :meth:`Transformer.unstack_layers` (or :func:`unstack_for_inference` on a whole
model) turns the stacked weights into one array per layer, run by a Python loop. Same math; but a
scanned step slices each layer's weights out of the stack, and XLA:CPU copies that slice before
the matmul, which triples the memory traffic of a weight-bound decode step (Mimi's 8-layer
transformer on one 80 ms frame: 11-24 ms stacked, ~4 ms unstacked on a 2-core CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moshax.config import LAYER_LOOPS, TransformerConfig
from moshax.kernels.attention import target_platform
from moshax.layers.attention import KVCache, MultiHeadAttention, RowsKVCache
from moshax.layers.linear import Selector, shared
from moshax.layers.mlp import MLP
from moshax.layers.norms import make_norm
from moshax.layers.params import constant, param
from moshax.parallel.sharding import constrain, logical_to_spec

# ``layer_loop=auto`` unrolls a CPU's layer loop from this many weights per layer (16 MB in fp32):
# config (b)'s layers (7.2M temporal, 25.7M depth with its 8 steps' weights) gain ~12%; Mimi's
# (3.1M) gained nothing measurable and would only compile slower.
UNROLL_MIN_LAYER_PARAMS = 4_000_000

REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class TransformerBlock(nnx.Module):
    """x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x)).

    ``num_weights``: the attention and MLP projections get a leading ``depth_steps`` axis of that
    size (Moshi's depth transformer: a weight set per depth step; norms and LayerScales are shared
    by all steps, as in Kyutai's layer), picked per call by ``select``. ``windowed=False`` drops the
    attention window (``cfg.context``): the depth transformer attends to all its earlier steps.
    """

    def __init__(self, cfg: TransformerConfig, *, num_weights: int | None = None, windowed: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, rngs=rngs)
        self.self_attn = MultiHeadAttention(
            cfg.dim, cfg.num_heads, context=cfg.context if windowed else None, causal=cfg.causal,
            rope=cfg.positional == "rope", max_period=cfg.max_period, init_std=cfg.init_std,
            num_weights=num_weights, attention=cfg.attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, rngs=rngs)
        self.mlp = MLP(cfg.dim, cfg.hidden_dim, gated=cfg.gated, activation=cfg.activation,
                       init_std=cfg.init_std, num_weights=num_weights, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
        if cfg.layer_scale is not None:
            self.layer_scale_1 = param(rngs, constant(cfg.layer_scale), (cfg.dim,), ("norm",), param_dtype)
            self.layer_scale_2 = param(rngs, constant(cfg.layer_scale), (cfg.dim,), ("norm",), param_dtype)
        else:
            self.layer_scale_1 = self.layer_scale_2 = None

    def __call__(self, x, positions, cache: KVCache | None = None, *, select: Selector = shared,
                 position_major: bool = False):
        """x [B, T, dim] ([T, B, dim] when ``position_major``), positions [B, T]; ``select`` gives
        the projections' weights for these positions (see :mod:`moshax.layers.linear`)."""
        h, cache = self.self_attn(self.norm1(x), positions, cache, select=select, position_major=position_major)
        if self.layer_scale_1 is not None:
            h = h * self.layer_scale_1[...].astype(h.dtype)
        x = x + h.astype(x.dtype)
        h = self.mlp(self.norm2(x), select=select, position_major=position_major)
        if self.layer_scale_2 is not None:
            h = h * self.layer_scale_2[...].astype(h.dtype)
        x = x + h.astype(x.dtype)
        axes = ("act_length", "act_batch", "act_embed") if position_major else ("act_batch", "act_length", "act_embed")
        return constrain(x, axes), cache


class Transformer(nnx.Module):
    """``num_layers`` blocks with stacked weights (leading logical axis ``layers``)."""

    def __init__(self, cfg: TransformerConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.param_dtype = param_dtype

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"})
        def make_layers(rngs):
            return TransformerBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        # Set by a model whose decoding feeds this stack one position at a time (Helium, Moshi's
        # temporal transformer): its inference layout on a CPU then keeps RowsKVCache rings.
        self.decodes_one_query = False
        self.kv_rows = False

    @property
    def unstacked(self) -> bool:
        return isinstance(self.layers, nnx.List)

    def unstack_layers(self) -> None:
        """Switch to the inference layout: one :class:`TransformerBlock` (own arrays) per layer,
        and, on a CPU for a stack that decodes one query at a time (``decodes_one_query``) with
        XLA's attention, :class:`~moshax.layers.attention.RowsKVCache` rings from
        :meth:`init_state` (no per-step ring transposes). Run eagerly, outside ``jit``;
        checkpoints and training keep the stacked layout."""
        if self.unstacked:
            return
        cfg = self.cfg
        self.kv_rows = (self.decodes_one_query and jax.default_backend() == "cpu"
                        and cfg.attention in ("auto", "xla"))
        abstract = nnx.eval_shape(lambda: TransformerBlock(cfg, dtype=self.dtype, param_dtype=self.param_dtype,
                                                           rngs=nnx.Rngs(0)))
        stacked = nnx.to_pure_dict(nnx.state(self.layers))
        blocks = []
        for i in range(cfg.num_layers):
            graphdef, state = nnx.split(abstract)
            nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: a[i], stacked))
            blocks.append(nnx.merge(graphdef, state))
        self.layers = nnx.List(blocks)

    def init_state(self, batch: int, capacity: int | None = None, dtype=None) -> KVCache | list[KVCache]:
        """Empty KV ring buffers [B, capacity, H, D] (capacity defaults to context): stacked
        [layers, ...] in one :class:`KVCache`, or a list of one per layer when unstacked
        (:class:`~moshax.layers.attention.RowsKVCache` ones when the inference layout chose them)."""
        cfg = self.cfg
        if self.unstacked and self.kv_rows:
            return [RowsKVCache.empty(batch, capacity or cfg.context, cfg.num_heads, cfg.head_dim, dtype or self.dtype)
                    for _ in range(cfg.num_layers)]
        one = KVCache.empty(batch, capacity or cfg.context, cfg.num_heads, cfg.head_dim, dtype or self.dtype)
        if self.unstacked:
            return [one] + [jax.tree.map(jnp.copy, one) for _ in range(cfg.num_layers - 1)]
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.num_layers,) + a.shape), one)

    def __call__(self, x, positions, cache: KVCache | list[KVCache] | None = None):
        """x [B, T, dim], positions [B, T]; returns (x, cache) with cache None when not given."""
        if self.unstacked:
            caches = [None] * len(self.layers) if cache is None else cache
            new = []
            for block, layer_cache in zip(self.layers, caches):
                x, layer_cache = block(x, positions, layer_cache)
                new.append(layer_cache)
            return x, (None if cache is None else new)
        return scan_layers(self.layers, x, cache, self.cfg.remat, lambda layer, h, c: layer(h, positions, c),
                           loop=self.cfg.layer_loop)


def scan_layers(layers: nnx.Module, x, cache, remat: str, apply, *, prepare=None, loop: str = "scan"):
    """Run stacked ``layers`` over x with ``lax.scan`` (one traced layer whatever the depth):
    ``apply(layer, h, layer_cache) -> (h, new_layer_cache)``, rematerialized per ``remat``.
    ``prepare(state) -> state`` reshapes the stacked weights once, before the scan (e.g.
    :func:`flatten_projections`). ``loop`` (a ``layer_loop`` config value) may unroll the scan:
    see :func:`unrolls`. Returns (x, the stacked new caches or None)."""
    graphdef, state = nnx.split(layers)
    if prepare is not None:
        state = prepare(state)

    def body(carry, xs):
        layer_state, layer_cache = xs
        return apply(nnx.merge(graphdef, layer_state), carry, layer_cache)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT[remat], prevent_cse=False)
    leaves = jax.tree.leaves(state)
    layer_params = sum(a.size for a in leaves) // leaves[0].shape[0]
    return jax.lax.scan(body, x, (state, cache), unroll=unrolls(loop, layer_params))


def unrolls(loop: str, layer_params: int = UNROLL_MIN_LAYER_PARAMS) -> bool:
    """Whether the layer scan is unrolled: ``unrolled``; or ``auto`` when tracing for a CPU and a
    layer holds at least :data:`UNROLL_MIN_LAYER_PARAMS` weights. XLA:CPU copies each layer's
    weights out of the stack before its matmuls and writes each layer's gradients into zero-filled
    stacked buffers; unrolled, the slices are static and those copies go (config (b)'s train step
    on 2 cores: ~12% faster, docs/performance.md). Compile time then grows with depth, so small
    layers (tests, tiny configs: the copies are cheap) and TPUs/GPUs keep the scan."""
    if loop not in LAYER_LOOPS:
        raise ValueError(f"unknown layer_loop {loop!r} (one of {', '.join(LAYER_LOOPS)})")
    if loop != "auto":
        return loop == "unrolled"
    return target_platform() == "cpu" and layer_params >= UNROLL_MIN_LAYER_PARAMS


def flatten_projections(state: nnx.State) -> nnx.State:
    """Stacked :class:`TransformerBlock` weights with the fused projections flattened to 2-D
    matmuls (a bitcast each): ``in_proj`` [.., D, 3, H, Dh] -> [.., D, 3*H*Dh], ``out_proj``
    [.., H, Dh, D] -> [.., H*Dh, D], a gated ``linear_in`` [.., D, 2, F] -> [.., D, 2F]. The block
    takes either layout. Done once before the scan: reshaped inside the scan body, the weights
    would be scan residuals (a stacked copy) and their gradients would need a second zero-filled
    buffer. Unchanged when the mesh shards ``heads``/``mlp`` (merging the q/k/v or gate/up axis
    into a sharded axis would force a reshard)."""
    if _heads_split():
        return state
    pure = nnx.to_pure_dict(state)
    attn, mlp = pure["self_attn"], pure["mlp"]
    lead = attn["in_proj"].ndim - 4  # layers (and depth_steps) axes
    attn["in_proj"] = attn["in_proj"].reshape(attn["in_proj"].shape[: lead + 1] + (-1,))
    attn["out_proj"] = attn["out_proj"].reshape(attn["out_proj"].shape[:lead] + (-1, attn["out_proj"].shape[-1]))
    if mlp["linear_in"].ndim == lead + 3:  # gated
        mlp["linear_in"] = mlp["linear_in"].reshape(mlp["linear_in"].shape[: lead + 1] + (-1,))
    nnx.replace_by_pure_dict(state, pure)
    return state


def _heads_split() -> bool:
    """Whether the current mesh shards the ``heads`` or ``mlp`` logical axes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return False
    for entry in logical_to_spec(("heads", "mlp"), mesh.axis_names):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        if any(mesh.shape[n] > 1 for n in names):
            return True
    return False


def unstack_for_inference(model: nnx.Module) -> nnx.Module:
    """Every :class:`Transformer` in ``model`` switched to the unstacked inference layout (in
    place; returns ``model``). Caches from ``init_state``/``init_state`` made afterwards match."""
    for module in [m for _, m in nnx.iter_graph(model) if isinstance(m, Transformer)]:
        module.unstack_layers()
    return model
