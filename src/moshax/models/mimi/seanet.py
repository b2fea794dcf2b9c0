"""SEANet encoder/decoder (causal, channels-last ``[B, T, C]``), batch and streaming.

Encoder: conv(k7) -> per ratio (reversed): residual block(s), ELU, strided conv (kernel 2 x ratio)
-> ELU -> conv(k3). Decoder: conv(k7) -> per ratio: ELU, transposed conv (kernel 2 x ratio),
residual block(s) -> ELU -> conv(k3), no final activation. Residual block:
``x + conv1x1(ELU(conv_k(ELU(x))))`` with the hidden width ``dim // compress``.

Every module runs in one code path for batch (``state=None``) and streaming (a state pytree
mirroring the module tree); ``__call__(x)``, ``init_state(batch)``, ``step(x, state)``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moshax.layers.activations import elu
from moshax.layers.conv import Conv1d, ConvTranspose1d
from moshax.models.mimi.config import SEANetConfig


def _apply(module, x, state):
    """Run a conv module in batch mode (state None) or one streaming step."""
    if state is None:
        return module(x), None
    return module.step(x, state)


class _Streaming(nnx.Module):
    """Gives ``__call__`` / ``step`` from a ``_run(x, state)`` that handles both modes."""

    def __call__(self, x):
        return self._run(x, None)[0]

    def step(self, x, state):
        return self._run(x, state)


class ResBlock(_Streaming):
    def __init__(self, dim: int, *, kernel_size: int, dilation: int, compress: int, true_skip: bool,
                 pad_mode: str, alpha: float, dtype, param_dtype, rngs: nnx.Rngs):
        hidden = dim // compress
        kw = dict(pad_mode=pad_mode, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.alpha = alpha
        self.conv1 = Conv1d(dim, hidden, kernel_size, dilation=dilation, **kw)
        self.conv2 = Conv1d(hidden, dim, 1, **kw)
        self.shortcut = None if true_skip else Conv1d(dim, dim, 1, **kw)

    def init_state(self, batch: int):
        return {"conv1": self.conv1.init_state(batch), "conv2": self.conv2.init_state(batch),
                "shortcut": None if self.shortcut is None else self.shortcut.init_state(batch)}

    def _run(self, x, state):
        st = state or {"conv1": None, "conv2": None, "shortcut": None}
        h, s1 = _apply(self.conv1, elu(x, self.alpha), st["conv1"])
        h, s2 = _apply(self.conv2, elu(h, self.alpha), st["conv2"])
        if self.shortcut is None:
            skip, s3 = x, None
        else:
            skip, s3 = _apply(self.shortcut, x, st["shortcut"])
        new = None if state is None else {"conv1": s1, "conv2": s2, "shortcut": s3}
        return skip.astype(h.dtype) + h, new


def _res_blocks(cfg: SEANetConfig, dim: int, dtype, param_dtype, rngs):
    return nnx.List([
        ResBlock(dim, kernel_size=cfg.residual_kernel_size, dilation=cfg.dilation_base ** j,
                 compress=cfg.compress, true_skip=cfg.true_skip, pad_mode=cfg.pad_mode, alpha=cfg.elu_alpha,
                 dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for j in range(cfg.n_residual_layers)])


class EncoderBlock(_Streaming):
    """Residual block(s) then ELU + strided conv (channels x 2)."""

    def __init__(self, cfg: SEANetConfig, dim: int, ratio: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.alpha = cfg.elu_alpha
        self.res = _res_blocks(cfg, dim, dtype, param_dtype, rngs)
        self.down = Conv1d(dim, dim * 2, 2 * ratio, stride=ratio, pad_mode=cfg.pad_mode, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    def init_state(self, batch: int):
        return {"res": [r.init_state(batch) for r in self.res], "down": self.down.init_state(batch)}

    def _run(self, x, state):
        res_states = []
        for i, r in enumerate(self.res):
            x, s = r._run(x, None if state is None else state["res"][i])
            res_states.append(s)
        x, sd = _apply(self.down, elu(x, self.alpha), None if state is None else state["down"])
        return x, None if state is None else {"res": res_states, "down": sd}


class DecoderBlock(_Streaming):
    """ELU + transposed conv (channels / 2) then residual block(s)."""

    def __init__(self, cfg: SEANetConfig, dim: int, ratio: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.alpha = cfg.elu_alpha
        self.up = ConvTranspose1d(dim, dim // 2, 2 * ratio, stride=ratio, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        self.res = _res_blocks(cfg, dim // 2, dtype, param_dtype, rngs)

    def init_state(self, batch: int):
        return {"up": self.up.init_state(batch), "res": [r.init_state(batch) for r in self.res]}

    def _run(self, x, state):
        x, su = _apply(self.up, elu(x, self.alpha), None if state is None else state["up"])
        res_states = []
        for i, r in enumerate(self.res):
            x, s = r._run(x, None if state is None else state["res"][i])
            res_states.append(s)
        return x, None if state is None else {"up": su, "res": res_states}


class _SEANetStack(_Streaming):
    """conv_in -> blocks -> ELU -> conv_out, batch or streaming (the encoder and the decoder)."""

    def init_state(self, batch: int):
        return {"conv_in": self.conv_in.init_state(batch), "blocks": [b.init_state(batch) for b in self.blocks],
                "conv_out": self.conv_out.init_state(batch)}

    def _run(self, x, state):
        x, s_in = _apply(self.conv_in, x, None if state is None else state["conv_in"])
        block_states = []
        for i, b in enumerate(self.blocks):
            x, s = b._run(x, None if state is None else state["blocks"][i])
            block_states.append(s)
        x, s_out = _apply(self.conv_out, elu(x, self.alpha), None if state is None else state["conv_out"])
        return x, None if state is None else {"conv_in": s_in, "blocks": block_states, "conv_out": s_out}


class SEANetEncoder(_SEANetStack):
    """Audio [B, T, channels] -> latent [B, T // hop, dimension]."""

    def __init__(self, cfg: SEANetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.alpha = cfg.elu_alpha
        kw = dict(pad_mode=cfg.pad_mode, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_in = Conv1d(cfg.channels, cfg.n_filters, cfg.kernel_size, **kw)
        blocks, mult = [], 1
        for ratio in reversed(cfg.ratios):
            blocks.append(EncoderBlock(cfg, mult * cfg.n_filters, ratio, dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs))
            mult *= 2
        self.blocks = nnx.List(blocks)
        self.conv_out = Conv1d(mult * cfg.n_filters, cfg.dimension, cfg.last_kernel_size, **kw)


class SEANetDecoder(_SEANetStack):
    """Latent [B, T, dimension] -> audio [B, T * hop, channels]."""

    def __init__(self, cfg: SEANetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.alpha = cfg.elu_alpha
        kw = dict(pad_mode=cfg.pad_mode, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        mult = 2 ** len(cfg.ratios)
        self.conv_in = Conv1d(cfg.dimension, mult * cfg.n_filters, cfg.kernel_size, **kw)
        blocks = []
        for ratio in cfg.ratios:
            blocks.append(DecoderBlock(cfg, mult * cfg.n_filters, ratio, dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs))
            mult //= 2
        self.blocks = nnx.List(blocks)
        self.conv_out = Conv1d(cfg.n_filters, cfg.channels, cfg.last_kernel_size, **kw)
