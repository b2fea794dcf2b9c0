"""Runs Kyutai's own ``moshi.server`` (moshi 0.2.13) unchanged, with two adjustments for a CPU and
exact comparisons, made from outside: the LM is loaded in float32 (the server's CLI only offers
bfloat16/float16) and ``torch.cuda.synchronize`` (called once after its warm-up) is a no-op on a
machine without CUDA.

    python tests/kyutai_server.py --host 127.0.0.1 --port P --device cpu --static none \
        --moshi-weight LM --mimi-weight MIMI --tokenizer SPM --config-path CONFIG.json
"""

import os
import runpy

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from moshi.models import loaders  # noqa: E402

_get_moshi = loaders.CheckpointInfo.get_moshi


def _float32(self, device="cpu", dtype=None, **kw):
    return _get_moshi(self, device=device, dtype=torch.float32, **kw)


loaders.CheckpointInfo.get_moshi = _float32
torch.cuda.synchronize = lambda *a, **k: None
torch.set_num_threads(1)
runpy.run_module("moshi.server", run_name="__main__")
