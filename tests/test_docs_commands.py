"""The `moshax ...` commands shown in README.md, docs/*.md and launch/README.md match the CLI, and
the ones that can run here do run.

* Every command in the docs (fenced blocks and inline `moshax ...` spans) names real subcommands
  and real flags of the argparse parser (`moshax <cmd> --help`); a fenced command without
  placeholders parses as written.
* Every fenced command is in :data:`RUN` (run in a temp dir, in order, after the data it needs
  was prepared by the commands before it; tiny configs with a few steps) or in :data:`SKIP` with
  the reason. A new doc command that is in neither fails the test: add it to one of them.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from moshax.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "launch" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHORT = ["train.steps=2", "train.eval_every=2", "train.eval_batches=1", "train.log_every=1", "checkpoint.every=2"]

# doc command (as written, comment stripped) -> argv that runs it here (None: as written, with the
# optional [...] parts left out) + the arguments appended. Run in this order, in one temp dir.
RUN: dict[str, list[str] | None] = {
    "moshax data corpus --output data/corpus": None,
    # the synopsis asks for 32k pieces; the generated corpus makes 512 (what configs/helium_tiny.yaml uses)
    "moshax tokenizer train --input corpus.txt [more.jsonl ...] --vocab-size 32000 --output tok/spm [--model-type bpe]":
        ["tokenizer", "train", "--input", "data/corpus/train.txt", "--vocab-size", "512",
         "--output", "data/tokenizer/spm"],
    "moshax train --config configs/helium_tiny.yaml [--workdir DIR] [--max-steps N] [key=value ...]":
        ["train", "--config", "configs/helium_tiny.yaml", *SHORT],
    "moshax data tokenize --config CFG --output DIR":
        ["data", "tokenize", "--config", "configs/helium_tiny.yaml", "--output", "data/helium_tiny_shards"],
    "moshax config show --config CFG [key=value ...]": ["config", "show", "--config", "configs/moshi_tiny.yaml",
                                                       "train.steps=5"],
    "moshax convert from-kyutai --model moshi model.safetensors --output ckpt/moshiko [--kyutai-config CONFIG.json]":
        None,  # a tiny LM prepared as model.safetensors + model.json (the JSON beside it gives the architecture)
    "moshax convert to-kyutai --model moshi --checkpoint ckpt/moshiko --output back.safetensors": None,
    "moshax convert from-kyutai --model mimi tokenizer-e351c8d8-checkpoint125.safetensors --output ckpt/mimi":
        None,  # a tiny Mimi under the released file's name, with its .json beside it
    "moshax mimi encode --checkpoint ckpt/mimi --input talk.flac --output talk.npy [--num-codebooks 8]": None,
    "moshax mimi decode --checkpoint ckpt/mimi --input talk.npy --output talk.wav": None,
    "moshax convert to-kyutai --model mimi --checkpoint ckpt/mimi --output mimi.safetensors": None,
}

# The Moshi chain (its train-step compile alone is about a minute here): a `slow` test, after its
# own corpus and tokenizer (the first two RUN commands).
SLOW_RUN: dict[str, list[str] | None] = {
    "moshax data synth-multistream --output DIR ...":  # as configs/moshi_tiny.yaml's comment, fewer examples
        ["data", "synth-multistream", "--output", "data/moshi_tiny/train", "--examples", "16",
         "--text-from", "data/corpus/train.txt", "--tokenizer", "data/tokenizer/spm.model"],
    "moshax train --config configs/moshi_tiny.yaml [task.init_from=]":  # the doc's option: from scratch
        ["train", "--config", "configs/moshi_tiny.yaml", "task.init_from=", *SHORT],
    "moshax eval --checkpoint runs/moshi_tiny --shards data/moshi_tiny/eval": None,
}

_FLEET = "tests/test_data_beam.py runs beam + tokenize-audio on synthesized dialogues (in process and as the CLI)"
SKIP: dict[str, str] = {
    "moshax data beam --input DIR|gs://... --output SEGMENTS [--runner DataflowRunner] [-- BEAM_OPTIONS]":
        "synopsis; " + _FLEET,
    "moshax data tokenize-audio --segments SEGMENTS --output DIR --mimi-checkpoint CKPT [--multihost]":
        "synopsis; " + _FLEET,
    "moshax data beam --input recordings/ --output segments/ --tokenizer spm.model --transcripts transcripts/ "
    "diarization.num_speakers=2 -- --direct_num_workers=2 --direct_running_mode=multi_processing": _FLEET,
    "moshax data tokenize-audio --segments segments/ --output shards/ --mimi-checkpoint mimi.safetensors": _FLEET,
    "moshax data tokenize-audio --segments /mnt/segments --output /mnt/shards --mimi-checkpoint "
    "/mnt/mimi.safetensors --multihost": "a TPU slice's hosts; tests/test_data_beam.py runs 2 processes on localhost",
    "moshax data tokenize-audio ... --coordinator 10.0.0.2:1234 --num-processes 4 --process-id $I":
        "several hosts; tests/test_data_beam.py runs 2 processes on localhost",
    "moshax data beam --input gs://BUCKET/audio/ --output gs://BUCKET/segments/ --tokenizer spm.model --transcripts "
    "/opt/transcripts --runner DataflowRunner -- --project PROJECT --region us-central1 --temp_location "
    "gs://BUCKET/tmp --sdk_container_image us-docker.pkg.dev/PROJECT/moshax/beam-worker:latest --machine_type "
    "n2-highcpu-32 --max_num_workers 40 --experiments=use_runner_v2": "Dataflow: a GCP project (no network here)",
    "moshax data beam --input /data/audio --output /data/segments --tokenizer spm.model --runner FlinkRunner -- "
    "--flink_master=flink-jobmanager:8081 --environment_type=DOCKER --environment_config=REGISTRY/moshax/beam-worker:latest "
    "--parallelism=256": "a Flink cluster",
    "moshax data beam ... --runner SparkRunner -- --spark_master_url=spark://MASTER:7077 --environment_type=DOCKER "
    "--environment_config=REGISTRY/moshax/beam-worker:latest": "a Spark cluster",
    "moshax serve --checkpoint LM_CKPT --mimi-checkpoint MIMI_CKPT [--tokenizer tok.model] [--host 127.0.0.1] "
    "[--port 8998] [--slots 4] [--temperature 0.8] [--top-k 250] [--text-temperature 0.7] [--text-top-k 25] "
    "[--auth-token TOKEN] [--allow-origin https://example.org]":
        "a long-running server; tests/test_serve.py::test_serve_cli_talks_and_stops_on_sigterm runs it",
    "moshax compile --config configs/mimi_full.yaml --topology v5e:2x2 --step decode":
        "TPU AOT compile: slow (tests/test_generate.py::test_decode_step_compiles_for_v5e)",
    "moshax compile --config configs/moshi_7b.yaml --topology v5e:2x2 --step decode [--batch B]":
        "TPU AOT compile of 7B: slow (tests/test_generate.py::test_decode_step_compiles_for_v5e)",
    'moshax generate --checkpoint HELIUM_CKPT --prompt "Once upon" --tokenizer tok.model [--max-tokens 64]':
        "placeholders; tests/test_generate.py::test_generate_cli_helium runs it on a tiny checkpoint",
    "moshax generate --checkpoint HELIUM_CKPT --prompt-ids 1,52,7 [--text-temperature 0]":
        "placeholders; tests/test_generate.py::test_generate_cli_helium runs it on a tiny checkpoint",
    "moshax generate --checkpoint LM_CKPT --mimi-checkpoint MIMI_CKPT --input user.wav --output moshi.wav "
    "[--text-output moshi.txt] [--tokens-output tokens.npy] [--tokenizer tok.model] [--temperature 0.8] "
    "[--top-k 250] [--text-temperature 0.7] [--text-top-k 25] [--seed 0] [--batch-size 1]":
        "placeholders; tests/test_generate.py::test_generate_cli_moshi runs it on tiny checkpoints",
    "moshax data speech --output DIR": "eSpeak NG synthesis: docs/mimi.md's concrete command is the one listed",
    "moshax data speech --output data/speech": "eSpeak NG corpus + Mimi GAN training take minutes: "
                                               "tests/test_audio_data.py and tests/test_mimi_training.py",
    "moshax train --config configs/mimi_tiny.yaml": "Mimi GAN step compile is too slow for this test: "
                                                    "tests/test_mimi_training.py trains it",
    "moshax eval --checkpoint runs/mimi_tiny --audio data/speech/eval": "needs the mimi_tiny run above; "
                                                                        "tests/test_eval_cli.py runs eval --audio",
    "moshax compile --config CFG --topology v5p:4x4x4 [--step train|decode] [--sweep]":
        "TPU AOT compile: slow (tests/test_compile_tpu.py; --sweep: tests/test_roofline.py)",
    "moshax data diarize AUDIO... [--output OUT.rttm]": "synopsis; tests/test_diarize.py runs the command",
    "moshax data inspect DIR [--decode N --output DIR]": "synopsis; tests/test_prepare.py runs inspect --decode",
    "moshax data inspect DIR [--decode N --output LISTEN_DIR]": "synopsis; tests/test_prepare.py runs inspect --decode",
    "moshax data prepare --input DIR --output DIR --mimi-checkpoint CKPT --tokenizer SPM.model [--transcripts DIR | "
    "--asr pocketsphinx | --asr whisper:DIR] [--stereo-split] [--num-workers N] [--worker-index I --num-worker-hosts M] "
    "[--retry-errors] [--config configs/data/prepare.yaml] [key=value ...]":
        "synopsis; tests/test_prepare.py runs prepare (CLI, hosts, resume, ASR) and `make data-quickstart` end to end",
    "moshax data prepare --input DIR --output DIR --mimi-checkpoint CKPT ...": "synopsis; tests/test_prepare.py",
    "moshax data synth-dialogues --output DIR": "eSpeak NG synthesis: tests/test_prepare.py and `make data-quickstart`",
    "moshax data transcribe AUDIO... --output DIR [--asr pocketsphinx|whisper:DIR]":
        "synopsis; tests/test_asr.py runs the command",
    "moshax generate --checkpoint LM --mimi-checkpoint MIMI --input USER.wav --output MOSHI.wav":
        "placeholders; tests/test_generate.py::test_generate_cli_moshi runs it on tiny checkpoints",
    "moshax mimi init --config configs/mimi_tiny.yaml --output DIR": "`make data-quickstart` runs it; "
                                                                     "tests/test_prepare.py builds the same model",
    "moshax compile --config configs/helium_7b.yaml --topology v5p:2x4x4": "TPU AOT compile of 7B: slow "
                                                                          "(tests/test_compile_tpu.py)",
    "moshax convert from-kyutai|to-kyutai --model moshi|mimi ...": "synopsis; the concrete convert commands run",
    "moshax mimi encode|decode --checkpoint CKPT --input IN --output OUT": "synopsis; docs/mimi.md's encode/decode run",
    "moshax eval --checkpoint CKPT --shards DIR | --audio DIR": "synopsis; the concrete eval commands run",
    "moshax launch tpu-vm ... [--dry-run]": "synopsis; needs gcloud (tests/test_launch.py covers the dry run)",
    "moshax launch gke ... [--output JOBSET.yaml]": "synopsis; tests/test_launch.py renders the JobSet",
    "moshax data tokenize --config configs/helium_7b.yaml --output /gcs/my-bucket/data/helium-shards":
        "needs Kyutai's 32k tokenizer (downloaded by the user) and a mounted bucket",
    "moshax launch tpu-vm --name helium-7b --zone us-east5-a --accelerator-type v5p-64 --project MY_PROJECT --spot "
    "--config configs/helium_7b.yaml --workdir gs://my-bucket/runs/helium-7b --dry-run "
    "data.train_shards=/gcs/my-bucket/data/helium-shards": "tests/test_launch.py covers the dry run",
    "moshax launch gke --name helium-7b --image REGION-docker.pkg.dev/PROJECT/moshax:TAG --accelerator-type v5p-64 "
    "--config configs/helium_7b.yaml --workdir gs://my-bucket/runs/helium-7b --service-account moshax "
    "--output helium-7b.yaml": "tests/test_launch.py renders the JobSet",
}


# ------------------------------------------------------------------------------------ extraction


def _strip_comment(line: str) -> str:
    return re.split(r"\s+#\s", line, maxsplit=1)[0].strip()


def doc_commands() -> list[tuple[str, int, str, bool]]:
    """(file, line, command, fenced) for every `moshax ...` command in the docs."""
    out = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        fenced, i = False, 0
        while i < len(lines):
            line = lines[i]
            if line.strip().startswith("```"):
                fenced = not fenced
                i += 1
                continue
            if fenced and line.strip().startswith("moshax "):
                start, text = i, line.strip()
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1].rstrip() + " " + lines[i].strip()
                out.append((path.name, start + 1, _strip_comment(text), True))
            elif not fenced:
                for span in re.findall(r"`(moshax [^`]+)`", line):
                    out.append((path.name, i + 1, span.strip(), False))
            i += 1
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _parsers_for(words: list[str]) -> list[tuple[argparse.ArgumentParser, list[str]]]:
    """The (sub)parsers a command names, one per `a|b` alternative, with the remaining words."""
    found = []

    def walk(parser, rest, path):
        subs = _subparsers(parser)
        if rest and subs and not rest[0].startswith("-"):
            for alt in rest[0].split("|"):
                assert alt in subs, f"`moshax {' '.join(path)} {alt}`: no such command (have {', '.join(subs)})"
                walk(subs[alt], rest[1:], path + [alt])
        else:
            found.append((parser, rest))

    walk(build_parser(), words, [])
    return found


def _flags(words: list[str]) -> list[str]:
    """The command's own flags (after a bare ``--`` come another program's: Beam's options)."""
    if "--" in words:
        words = words[: words.index("--")]
    flags = []
    for w in words:
        for part in w.strip("[]").split("|"):
            part = part.strip("[]")
            if part.startswith("-") and part not in ("-", "--"):
                flags.append(part.split("=", 1)[0])
    return flags


def _is_placeholder(cmd: str) -> bool:
    return bool(re.search(r"[\[\]|]|\.\.\.|\b[A-Z][A-Z_]{1,}\b", cmd.replace("MY_PROJECT", "")))


COMMANDS = doc_commands()


def test_doc_commands_were_found():
    fenced = [c for c in COMMANDS if c[3]]
    assert len(fenced) >= 20 and any(f == "mimi.md" for f, *_ in fenced) and any(f == "README.md" for f, *_ in fenced)


@pytest.mark.parametrize("where, line, cmd, fenced", COMMANDS, ids=[f"{c[0]}:{c[1]}" for c in COMMANDS])
def test_doc_command_matches_the_cli(where, line, cmd, fenced):
    words = shlex.split(cmd)[1:]
    for parser, rest in _parsers_for(words):
        known = set(parser._option_string_actions)
        unknown = [f for f in _flags(rest) if f not in known]
        assert not unknown, (f"{where}:{line}: `{cmd}`: {parser.prog} has no {', '.join(unknown)} "
                             f"(see {parser.prog} --help)")
    if fenced and not _is_placeholder(cmd):
        try:
            build_parser().parse_args(words)
        except SystemExit as e:
            pytest.fail(f"{where}:{line}: `{cmd}` does not parse (exit {e.code})")


def test_every_fenced_command_is_run_or_skipped_with_a_reason():
    fenced = {cmd for _, _, cmd, f in COMMANDS if f}
    listed = set(RUN) | set(SLOW_RUN) | set(SKIP)
    missing = sorted(fenced - listed)
    assert not missing, f"doc commands in neither RUN, SLOW_RUN nor SKIP of {__file__}: {missing}"
    stale = sorted(listed - fenced)
    assert not stale, f"RUN/SLOW_RUN/SKIP name commands no doc shows any more: {stale}"
    assert len(listed) == len(RUN) + len(SLOW_RUN) + len(SKIP)
    assert all(reason.strip() for reason in SKIP.values())


# ------------------------------------------------------------------------------------ running


def _as_written(cmd: str) -> list[str]:
    """The command without its optional [...] parts."""
    return shlex.split(re.sub(r"\s*\[[^\]]*\]", "", cmd))[1:]


def _prepare(tmp: Path) -> None:
    """What the docs assume a user has: the configs, Kyutai-style weights (tiny stand-ins with their
    config JSON beside them), an audio file."""
    import jax
    from flax import nnx

    from moshax.config import TransformerConfig, load_config
    from moshax.interop import lm_weights, mimi_weights
    from moshax.interop.kyutai_config import config_beside, write_kyutai_config
    from moshax.models.mimi.model import Mimi
    from moshax.models.moshi_lm import MoshiLM

    from test_audio_data import write_flac
    from test_mimi_cli import tone
    from test_moshi_lm import tiny_config

    shutil.copytree(ROOT / "configs", tmp / "configs")
    mcfg = load_config(str(ROOT / "configs" / "mimi_tiny.yaml")).model
    mimi = Mimi(mcfg, rngs=nnx.Rngs(0))
    released = tmp / "tokenizer-e351c8d8-checkpoint125.safetensors"
    mimi_weights.save_mimi(mimi, released)
    write_kyutai_config(config_beside(released), mimi_weights.config_to_kyutai(mcfg))
    lcfg = tiny_config(transformer=TransformerConfig(dim=32, num_heads=2, num_layers=1, hidden_dim=88, context=50))
    lm = MoshiLM(lcfg, rngs=nnx.Rngs(0))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(lm, nnx.Param)))
    lm_weights.write_kyutai(tmp / "model.safetensors", lm_weights.params_to_kyutai(params, {}, lcfg))
    write_kyutai_config(tmp / "model.json", lm_weights.config_to_kyutai(lcfg))
    write_flac(tmp / "talk.flac", tone(0.7, sr=24000)[0], 24000)


def _run(commands: dict, capsys) -> None:
    for cmd, argv in commands.items():
        argv = _as_written(cmd) if argv is None else argv
        rc = main(argv)
        cap = capsys.readouterr()
        assert rc == 0, f"`{cmd}` -> moshax {' '.join(argv)}: exit {rc}: {cap.err.strip().splitlines()[-1:]}"
        if argv[:2] == ["data", "synth-multistream"]:  # and the eval shards, as configs/moshi_tiny.yaml's comment
            assert main(["data", "synth-multistream", "--output", "data/moshi_tiny/eval", "--examples", "8",
                         "--seed", "1", "--text-from", "data/corpus/eval.txt", "--tokenizer",
                         "data/tokenizer/spm.model"]) == 0


@pytest.mark.slow  # ~40-90 s on 2 cores; `make test` stays under 15 min, CI's slow suite runs it
def test_doc_commands_run(tmp_path, monkeypatch, capsys):
    _prepare(tmp_path)
    monkeypatch.chdir(tmp_path)
    _run(RUN, capsys)
    assert (tmp_path / "runs" / "helium_tiny").is_dir() and (tmp_path / "talk.wav").is_file()
    assert (tmp_path / "mimi.json").is_file() and (tmp_path / "back.json").is_file()
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


@pytest.mark.slow
def test_doc_moshi_commands_run(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    _run(dict(list(RUN.items())[:2]), capsys)  # the corpus and the tokenizer
    _run(SLOW_RUN, capsys)
    assert (tmp_path / "runs" / "moshi_tiny" / "metrics.jsonl").is_file()
