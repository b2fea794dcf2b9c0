"""`moshax compile`'s roofline: collective bytes read from the HLO (loops counted by their trip
counts), predicted step time at least each bound, and `--sweep` ranking layouts."""

import pytest

from requirements import require_module

from moshax.parallel.roofline import collective_bytes, run_counts, split_computations

HLO = """HloModule toy

%cond (p: (s32[], bf16[8,4])) -> pred[] {
  %p = (s32[], bf16[8,4]) parameter(0)
  %c = s32[] constant(3)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%fused (x: bf16[2,4]) -> bf16[8,4] {
  %x = bf16[2,4] parameter(0)
  ROOT %ag = bf16[8,4]{1,0} all-gather(%x), replica_groups=[2,4]<=[8], dimensions={0}
}

%body (p: (s32[], bf16[8,4])) -> (s32[], bf16[8,4]) {
  %p = (s32[], bf16[8,4]) parameter(0)
  %x = bf16[2,4] constant({...})
  %f = bf16[8,4] fusion(%x), kind=kCustom, calls=%fused
  ROOT %t = (s32[], bf16[8,4]) tuple(%i, %f)
}

ENTRY %main (a: f32[16]) -> f32[16] {
  %a = f32[16] parameter(0)
  %w = (s32[], bf16[8,4]) while(%init), condition=%cond, body=%body
  ROOT %ar = f32[16]{0} all-reduce(%a), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
}
"""


def test_collectives_are_counted_per_loop_trip():
    comps, entry = split_computations(HLO)
    assert entry == "main" and set(comps) == {"cond", "fused", "body", "main"}
    counts = run_counts(comps, entry)
    assert counts["body"] == 3 and counts["fused"] == 3
    got = collective_bytes(HLO, 8)
    assert got["all-gather"] == pytest.approx(3 * 64 * 3 / 4)  # 3 trips x 64 bytes x (g-1)/g, g = 4
    assert got["all-reduce"] == pytest.approx(2 * 64 * 7 / 8)


@pytest.fixture(scope="module")
def reports():
    require_module("libtpu", "TPU compile checks need the tpu extra (libtpu)")
    from moshax.config import load_config
    from moshax.training.aot import compile_train_step
    from moshax.training.task import make_task

    out = {}
    for layers in (2, 4):
        cfg = load_config("configs/helium_tiny.yaml", ["mesh.fsdp=4", "mesh.tensor=2",
                                                      f"model.transformer.num_layers={layers}"])
        out[layers] = compile_train_step(cfg, make_task(cfg), "v5e:2x4")
    return out


def test_predicted_step_time_is_at_least_each_bound(reports):
    rf = reports[4].roofline
    assert rf is not None and rf.chip == "v5e"
    assert rf.step_s >= max(rf.compute_s, rf.memory_s, rf.comm_s) > 0
    assert rf.ici_by_kind["all-gather"] > 0 and rf.ici_bytes > 0  # fsdp gathers weights
    assert 0 < rf.mfu_bound <= 1 and rf.tokens_per_step_per_chip > 0
    text = reports[4].format()
    assert "predicted step time" in text and "MFU bound" in text


def test_scanned_layers_count_once_per_trip(reports):
    """Twice the layers: about twice the weight all-gathers (the loop's trip count is read)."""
    two, four = reports[2].roofline.ici_by_kind["all-gather"], reports[4].roofline.ici_by_kind["all-gather"]
    assert 1.6 < four / two < 2.4, (two, four)


def test_sweep_ranks_layouts(capsys):
    require_module("libtpu", "TPU compile checks need the tpu extra (libtpu)")
    from moshax.cli import main

    assert main(["compile", "--config", "configs/helium_tiny.yaml", "--topology", "v5e:2x2", "--sweep",
                 "--sweep-tensor", "1,2,3", "--sweep-remat", "full", "--sweep-micro-batches", "1,3"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("ranked by predicted step time"):].splitlines()[2:]
    ranked = [float(line.split()[4]) for line in table if "skipped" not in line]
    assert len(ranked) == 2 and ranked == sorted(ranked)
    for line in table:
        if "skipped" not in line:  # the predicted step is the largest of its compute / HBM / ICI times
            step, parts = float(line.split()[4]), [float(x) for x in line.split()[6].split("/")]
            assert max(parts) == pytest.approx(step, rel=0.01, abs=0.006)
    assert any("skipped: batch" in line for line in table)  # micro-batches 3 does not divide the batch


def test_a_tpu_topology_mesh_keeps_the_layer_scan():
    """``layer_loop=auto`` unrolls big layers for this CPU, but under a mesh of TPU topology devices
    (what ``moshax compile`` traces in) it keeps the scan, whose trip counts the roofline reads."""
    require_module("libtpu", "TPU compile checks need the tpu extra (libtpu)")
    import jax
    import numpy as np

    from moshax.layers.transformer import unrolls
    from moshax.training.aot import topology_devices

    mesh = jax.sharding.Mesh(np.array(topology_devices("v5e:2x2")), ("data",))
    assert unrolls("auto")
    with jax.set_mesh(mesh):
        assert not unrolls("auto") and unrolls("unrolled")
