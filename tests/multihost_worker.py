"""One process of a multi-process training run (started by test_multihost.py).

argv[1]: JSON {"config": {...}, "workdir", "max_steps", "out", "coordinator", "num_processes", "process_id"}.
Runs the real trainer and writes process 0's losses and per-leaf param sums to "out".
"""

import json
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    from moshax.parallel.distributed import DistributedSpec, initialize

    if spec["num_processes"] > 1:
        initialize(DistributedSpec(spec["coordinator"], spec["num_processes"], spec["process_id"]))
    import jax
    import jax.numpy as jnp

    from moshax.config import from_dict
    from moshax.training.lm_task import LMTask
    from moshax.training.trainer import Trainer

    cfg = from_dict(spec["config"])
    trainer = Trainer(cfg, LMTask(cfg), workdir=spec["workdir"])
    summary = trainer.run(max_steps=spec.get("max_steps"))
    sums = [float(jnp.sum(x.astype(jnp.float64) if x.dtype == jnp.float64 else x)) for x in
            jax.tree.leaves(trainer.state["params"])]
    if jax.process_index() == 0:
        with open(spec["out"], "w") as f:
            json.dump({"losses": [h["loss"] for h in summary["history"] if "loss" in h], "param_sums": sums,
                       "start": summary["start_step"], "end": summary["end_step"],
                       "resumed_from": summary["resumed_from"], "processes": jax.process_count(),
                       "devices": jax.device_count()}, f)


if __name__ == "__main__":
    main()
