"""``moshax convert``: Kyutai safetensors <-> moshax model checkpoints (the library:
:mod:`moshax.interop.convert`; checkpoint layout: :mod:`moshax.checkpoint.model`).

    moshax convert from-kyutai --model moshi|mimi WEIGHTS.safetensors --output CKPT_DIR [--kyutai-config CONFIG.json]
    moshax convert to-kyutai   --model moshi|mimi --checkpoint CKPT_DIR --output WEIGHTS.safetensors [--dtype bfloat16]

``to-kyutai`` writes the Kyutai config JSON beside the weights (``WEIGHTS.json``);
``from-kyutai`` reads ``WEIGHTS.json`` beside ``WEIGHTS.safetensors`` when ``--kyutai-config`` is
not given (the flag wins), else assumes the released architecture (moshiko / Mimi).
``--model lm`` is accepted as another name for ``moshi``.
"""

from __future__ import annotations

import argparse


def cmd_from_kyutai(args: argparse.Namespace) -> int:
    from moshax.interop.convert import from_kyutai

    info = from_kyutai(args.model, args.weights, args.output, args.kyutai_config, args.param_dtype)
    print(f"wrote {info['kind']} checkpoint {info['output']}: {info['params'] / 1e6:.2f}M params ({info['dtype']}; "
          f"config: {info['config']})")
    return 0


def cmd_to_kyutai(args: argparse.Namespace) -> int:
    from moshax.interop.convert import to_kyutai

    info = to_kyutai(args.model, args.checkpoint, args.output, args.dtype)
    print(f"wrote {info['output']}: {info['tensors']} tensors, {info['values'] / 1e6:.2f}M values ({info['dtype']}); "
          f"Kyutai config {info['config']}")
    return 0


def _kind_names() -> list[str]:
    from moshax import registry

    names = [k.name for k in registry.KINDS.values() if k.kyutai]
    return names + [a for k in registry.KINDS.values() if k.kyutai for a in k.aliases]


def add_parser(subparsers) -> None:
    conv = subparsers.add_parser("convert", help="convert Kyutai safetensors <-> moshax checkpoints (moshi, mimi)")
    sub = conv.add_subparsers(dest="direction", required=True)
    p = sub.add_parser("from-kyutai", help="Kyutai .safetensors -> moshax model checkpoint dir")
    p.add_argument("--model", required=True, choices=_kind_names(), help="model kind (lm = moshi)")
    p.add_argument("weights", help="Kyutai .safetensors file")
    p.add_argument("--output", required=True, help="new checkpoint directory")
    p.add_argument("--kyutai-config", help="JSON config in the reference loader's shape (default: WEIGHTS.json "
                   "beside the weights when present, else the released architecture)")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the stored params (default: the config's param_dtype, float32)")
    p.set_defaults(fn=cmd_from_kyutai)
    p = sub.add_parser("to-kyutai", help="moshax checkpoint (converted or trained) -> Kyutai .safetensors")
    p.add_argument("--model", required=True, choices=_kind_names(), help="model kind (lm = moshi)")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (converted, trainer workdir or checkpoints/)")
    p.add_argument("--output", required=True, help=".safetensors file to write (+ its Kyutai config, same stem .json)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="tensor dtype (default: the params' dtype; Kyutai's releases are bfloat16)")
    p.set_defaults(fn=cmd_to_kyutai)
