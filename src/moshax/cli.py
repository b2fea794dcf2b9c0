"""The ``moshax`` command.

    moshax train --config configs/helium_tiny.yaml [--workdir DIR] [--allow-config-change] [key=value ...]
    moshax config show --config CFG [key=value ...]
    moshax tokenizer train --input FILE [FILE ...] --vocab-size N --output PREFIX
    moshax compile --config CFG --topology v5p:4x4x4 [--step train|decode] [--sweep] [key=value ...]
    moshax launch tpu-vm ... [--dry-run] | moshax launch gke ...
    moshax data corpus|tokenize|synth-multistream|speech|synth-dialogues|... (DATA_COMMANDS)
    moshax convert | mimi | eval ...   (commands/)

Commands parse arguments, call the library and print; the model kinds come from
:mod:`moshax.registry`.

User mistakes (bad config, missing files, a mesh that does not fit) end in one line on stderr and
exit code 2; no stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path


# Modules exposing ``add_parser(subparsers)``; each sets ``fn`` on its parsers.
COMMAND_MODULES = ("moshax.commands.convert", "moshax.commands.mimi", "moshax.commands.evaluate",
                   "moshax.commands.generate", "moshax.commands.serve")


class UserError(Exception):
    """Anything the user can fix; printed as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a user mistake (light modules: no JAX, no Orbax import here)."""
    from data_pipeline.errors import DataError
    from moshax.checkpoint.errors import CheckpointError
    from moshax.config import ConfigError
    from moshax.registry import UnknownKind

    return (UserError, ConfigError, DataError, UnknownKind, CheckpointError, FileNotFoundError)


# ----------------------------------------------------------------------------- train


def _init_distributed(args: argparse.Namespace) -> None:
    from moshax.parallel.distributed import DistributedSpec, initialize

    initialize(DistributedSpec.from_env(args.coordinator, args.num_processes, args.process_id, args.multihost))


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (see src/moshax/parallel/distributed.py)")
    g.add_argument("--multihost", action="store_true", help="initialize jax.distributed from the platform (TPU VM, GKE)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0 (explicit multi-process setup)")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)


def cmd_train(args: argparse.Namespace) -> int:
    from moshax.config import load_config

    overrides = list(args.overrides)
    if args.profile:
        try:
            first, last = (int(x) for x in args.profile.split(":"))
        except ValueError:
            raise UserError(f"--profile {args.profile!r}: expected FIRST:LAST steps, e.g. 10:12") from None
        overrides.append(f"train.profile_steps=[{first}, {last}]")
    cfg = load_config(args.config, overrides)
    if args.workdir:
        cfg.workdir = args.workdir
    missing = cfg.missing_paths()  # before JAX starts: a wrong path prints in well under a second
    if missing:
        raise UserError(missing[0])
    _init_distributed(args)
    task = make_task(cfg)
    task.check_inputs()

    import jax

    from moshax.training.trainer import Trainer

    trainer = Trainer(cfg, task, allow_config_change=args.allow_config_change)
    summary = trainer.run(max_steps=args.max_steps)
    if summary["start_step"] == summary["end_step"] == cfg.train.steps:
        print(f"already finished: {trainer.workdir} is at step {cfg.train.steps} = train.steps; nothing to train "
              f"(set train.steps=N to go further)")
        return 0
    m = summary["metrics"]
    line = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
    print(f"done: steps {summary['start_step']} -> {summary['end_step']} "
          f"({'resumed' if summary['resumed_from'] is not None else 'fresh'}), "
          f"{summary['num_params'] / 1e6:.2f}M params, compile {summary['compile_seconds']:.1f}s, "
          f"workdir {trainer.workdir}")
    if summary["preempted"]:
        print(f"preempted: checkpoint saved at step {summary['end_step']}; run the same command to resume")
    if summary["peak_flops_per_device"] is None:
        print(f"mfu: n/a (no peak-FLOPs figure for {jax.devices()[0].device_kind!r} devices)")
    print(json.dumps(line))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from moshax.config import load_config
    from moshax.training import aot

    cfg = load_config(args.config, args.overrides)
    log = lambda line: print(line, flush=True)  # noqa: E731 - phases: minutes of work on a 7B config
    if args.sweep:
        ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
        rows = aot.sweep_layouts(cfg, make_task, args.topology, tensors=ints(args.sweep_tensor),
                                 remats=tuple(args.sweep_remat.split(",")), accums=ints(args.sweep_micro_batches),
                                 log=log)
        print(aot.format_sweep(rows, args.topology))
        return 0 if any(not r.error for r in rows) else 3
    if args.step == "decode":
        report = aot.compile_decode_step(cfg, args.topology, batch=args.batch, log=log)  # no training task needed
    else:
        report = aot.compile_train_step(cfg, make_task(cfg), args.topology, log=log)
    print(report.format())
    if args.json:
        import dataclasses

        extra = {"total_bytes": report.total_bytes, "fits": report.fits}
        if report.roofline is not None:
            rf = report.roofline
            extra["predicted"] = {"step_seconds": rf.step_s, "bound": rf.bound, "compute_seconds": rf.compute_s,
                                  "hbm_seconds": rf.memory_s, "ici_seconds": rf.comm_s, "mfu_bound": rf.mfu_bound}
        Path(args.json).write_text(json.dumps(dataclasses.asdict(report) | extra, indent=2, default=str))
    if not report.fits:
        print(f"moshax: error: {cfg.name} does not fit on {args.topology}: {report.total_bytes / aot.GiB:.1f} GiB "
              f"per chip > {report.hbm_bytes / aot.GiB:.1f} GiB HBM", file=sys.stderr)
        return 3
    return 0


def make_task(cfg):
    from moshax.training.task import make_task as _make

    return _make(cfg)


def cmd_config_show(args: argparse.Namespace) -> int:
    from moshax.config import dump_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    print(dump_yaml(cfg), end="")
    return 0


# ----------------------------------------------------------------------------- tokenizer / data


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizer import train_tokenizer

    for p in args.input:
        if not Path(p).is_file():
            raise UserError(f"input file not found: {p}")
    out = train_tokenizer(args.input, args.output, args.vocab_size, model_type=args.model_type)
    print(f"wrote {out}")
    return 0


def cmd_data_tokenize(args: argparse.Namespace) -> int:
    from data_pipeline.text_to_shards import tokenize_to_shards

    from moshax.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    manifest = tokenize_to_shards(cfg.data, args.output, split=args.split, records_per_shard=args.records_per_shard,
                                  config_dict={"data": to_dict(cfg.data)})
    stats = manifest["stats"]
    print(f"wrote {manifest['total_records']} rows of {cfg.data.seq_len + 1} tokens in {len(manifest['shards'])} "
          f"shard(s) to {args.output} ({stats['documents']} documents, {stats['tokens']} tokens)")
    return 0


# ``moshax data NAME``: (name, help, module, its add-arguments function, its command function).
# Each module keeps its flags beside its code; importing it must stay light (no JAX).
DATA_COMMANDS = [
    ("synth-multistream", "structured synthetic 17-stream Moshi shards (text from a corpus)",
     "data_pipeline.multistream", "add_synth_arguments", "synth_command"),
    ("speech", "an eSpeak NG speech corpus (train/eval wavs) for codec training",
     "data_pipeline.speech_synth", "add_speech_arguments", "speech_command"),
    ("synth-dialogues", "eSpeak NG two/three-voice dialogues with exact word times and speaker turns",
     "data_pipeline.dialogue_synth", "add_dialogue_arguments", "dialogue_command"),
    ("prepare", "recordings -> VAD, diarization, words, Mimi tokens -> multi-stream shards (resumable)",
     "moshax.commands.data_prepare", "add_prepare_arguments", "prepare_command"),
    ("beam", "the CPU stages of `prepare` (VAD, diarization, words, text) as an Apache Beam pipeline -> segments",
     "moshax.commands.data_fleet", "add_beam_arguments", "beam_command"),
    ("tokenize-audio", "`data beam` segments -> Mimi tokens -> the shards of `prepare` (multi-host JAX, resumable)",
     "moshax.commands.data_fleet", "add_tokenize_arguments", "tokenize_command"),
    ("inspect", "a shard directory's statistics, hashes verified; --decode N writes records back to audio + text",
     "moshax.commands.data_prepare", "add_inspect_arguments", "inspect_command"),
    ("diarize", "who speaks when: voice activity (Silero VAD) and speaker turns, written as RTTM",
     "data_pipeline.diarize", "add_diarize_arguments", "diarize_command"),
    ("transcribe", "word times for audio files (pocketsphinx | whisper:DIR, sidecars, forced alignment)",
     "data_pipeline.transcripts", "add_transcribe_arguments", "transcribe_command"),
]


def _run_data_command(module: str, command: str):
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), command)(args)

    return run


def cmd_data_corpus(args: argparse.Namespace) -> int:
    from data_pipeline.corpus import write_corpus

    paths = write_corpus(args.output, train_docs=args.train_docs, eval_docs=args.eval_docs, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moshax", description="JAX pretraining for Helium, Mimi and Moshi.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config (resumes from --workdir)")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/helium_tiny.yaml")
    p.add_argument("--workdir", help="run directory (default: the config's workdir)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps in this invocation (the run resumes later)")
    p.add_argument("--profile", metavar="FIRST:LAST",
                   help="write a JAX profiler trace of these steps to WORKDIR/profile (TensorBoard/XProf)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a workdir with a changed config when no change alters the checkpoints' shapes "
                        "(e.g. learning rate, batch size, data); config.yaml records each change with its step")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 mesh.fsdp=2")
    _add_distributed_flags(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("compile", help="compile the train step ahead of time for a TPU topology (no TPU needed)")
    p.add_argument("--config", required=True)
    p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v5e:2x2, v6e:4x4, v4:2x2x2")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--step", choices=["train", "decode"], default="train",
                   help="train: the full train step; decode: one streaming inference step with a KV cache")
    p.add_argument("--batch", type=int, default=1, help="sequences per decode step (--step decode)")
    p.add_argument("--sweep", action="store_true",
                   help="compile every fsdp x tensor / remat / micro-batch layout, ranked by predicted step time")
    p.add_argument("--sweep-tensor", default="1,2,4,8", help="tensor-parallel sizes to try (--sweep)")
    p.add_argument("--sweep-remat", default="full,dots", help="remat policies to try (--sweep)")
    p.add_argument("--sweep-micro-batches", default="1,2", help="gradient-accumulation steps to try (--sweep)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_compile)

    launch = sub.add_parser("launch", help="launch training on TPU VM pods or GKE").add_subparsers(
        dest="target", required=True)
    from moshax.launch import gke, tpu_vm

    p = launch.add_parser("tpu-vm", help="create/reuse a TPU VM slice, ship code, install, train on all workers")
    tpu_vm.add_arguments(p)
    p.set_defaults(fn=tpu_vm.run)
    p = launch.add_parser("gke", help="print a JobSet manifest (or an xpk command) for GKE")
    gke.add_arguments(p)
    p.set_defaults(fn=gke.run)

    for module in COMMAND_MODULES:  # commands that live next to their feature
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.add_parser(sub)

    tok = sub.add_parser("tokenizer", help="sentencepiece tokenizers").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a sentencepiece model from .txt/.jsonl files")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True, help="output prefix; writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    p.set_defaults(fn=cmd_tokenizer_train)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="action", required=True)
    p = data.add_parser("corpus", help="write the built-in generated text corpus (train.txt, eval.txt)")
    p.add_argument("--output", required=True)
    p.add_argument("--train-docs", type=int, default=20000)
    p.add_argument("--eval-docs", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_data_corpus)
    p = data.add_parser("tokenize", help="tokenize a config's text sources into packed ArrayRecord token shards")
    p.add_argument("--config", required=True)
    p.add_argument("--output", required=True, help="new directory for the shards and manifest.json")
    p.add_argument("--split", default="train", choices=["train", "eval"])
    p.add_argument("--records-per-shard", type=int, default=4096)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_data_tokenize)
    for name, help_text, module, add_args, command in DATA_COMMANDS:
        p = data.add_parser(name, help=help_text)
        mod = importlib.import_module(module)
        getattr(mod, add_args)(p)
        p.set_defaults(fn=_run_data_command(module, command))

    cfg = sub.add_parser("config", help="configs").add_subparsers(dest="action", required=True)
    p = cfg.add_parser("show", help="print a config resolved (base: chain, overrides, defaults) as YAML")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_config_show)
    return parser


def _tpu_or_cuda_present() -> bool:
    """TPU device nodes in the machine, or a JAX CUDA plugin installed (checked without JAX)."""
    import glob
    from importlib.util import find_spec

    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    return any(find_spec(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def _skip_absent_tpu() -> None:
    """With libtpu installed (the ``[tpu]`` extra) but no TPU in the machine, JAX probes for one
    at start-up and libtpu prints a page of metadata-server warnings on every command. There,
    and unless ``JAX_PLATFORMS`` says otherwise (or a CUDA plugin is installed), use the CPU.
    ``moshax compile`` still compiles for TPU topologies: that path does not need the platform."""
    import os
    from importlib.util import find_spec

    if "JAX_PLATFORMS" in os.environ or find_spec("libtpu") is None:
        return
    if _tpu_or_cuda_present():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def _cpu_only() -> bool:
    """Whether JAX will run on the CPU alone (decided without starting JAX): ``JAX_PLATFORMS``
    says ``cpu``, or it is unset and the machine has no TPU/GPU device nodes or CUDA plugin."""
    import glob
    import os

    platforms = os.environ.get("JAX_PLATFORMS")
    if platforms is not None:
        return platforms.strip().lower() == "cpu"
    return not (_tpu_or_cuda_present() or glob.glob("/dev/nvidia[0-9]*"))


def console_main() -> int:
    """The ``moshax`` command: :func:`main`, with glibc's allocator tuned for XLA:CPU steps on
    CPU-only runs first (:mod:`moshax.host_malloc`; in-process callers of :func:`main`, e.g.
    tests, keep their allocator)."""
    if _cpu_only():
        from moshax.host_malloc import tune_host_malloc

        try:
            tune_host_malloc()
        except ValueError as e:
            print(f"moshax: error: {e}", file=sys.stderr)
            return 2
    return main()


def main(argv: list[str] | None = None) -> int:
    _skip_absent_tpu()
    parser = build_parser()
    args = parser.parse_args(argv)
    errors = _user_errors()
    try:
        return args.fn(args)
    except errors as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"moshax: error: {msg}", file=sys.stderr)
        return 3 if type(e).__name__ == "DoesNotFit" else 2
    except KeyboardInterrupt:
        print("moshax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(console_main())
