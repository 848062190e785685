"""The `vlm-jax` command.

    vlm-jax train   --config configs/X.py[:arg] --workdir DIR [--config.key=value ...]
    vlm-jax eval    --config configs/X.py[:arg] --workdir DIR [--checkpoint STEP]
    vlm-jax forward --checkpoint DIR --inputs IN.npz --out OUT.npz [--mesh fsdp=8]
    vlm-jax generate --checkpoint DIR --prompt TEXT [--image PATH ...] [sampling flags]
    vlm-jax generate --checkpoint DIR --prompts IN.jsonl --out OUT.jsonl [sampling flags]
    vlm-jax convert-hf --hf_dir DIR --out DIR
    vlm-jax data    build --format pairs|llava|interleaved --input FILE --out DIR
    vlm-jax data    stats --config CONFIG [--data DIR]
    vlm-jax data    train-tokenizer --input FILE [FILE ...] --out PREFIX --vocab_size N
    vlm-jax data    builtin --out DIR [--image_size N] [--scale F] [--seed S]
    vlm-jax data    fewshot --source digits|photos --out DIR [--episodes N] [--image_size N] [--seed S]
    vlm-jax data    tfds --data_dir DIR (--builtin TASK [TASK ...] [--scale F] [--image_size N] [--seed S]
                                         | --name NAME --split SPLIT=FOLDER [--split SPLIT=FOLDER ...])
    vlm-jax plan    --config CONFIG --mesh data=N,fsdp=M,tensor=K [--devices N] [--device_memory_gb G]

`--config` and its overrides are ml_collections config flags. `forward` and `generate` read the params straight
into their shardings on `--mesh` (default: the checkpoint's mesh, fitted to the devices present). A user error
(`vlm_jax.errors.UserError`: bad config, arguments or inputs; a missing file)
is printed as one sentence and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from vlm_jax import distributed

USAGE = """usage: vlm-jax COMMAND [flags]

commands:
  train     train a config in a workdir (resumes from its latest checkpoint)
  eval      run a config's evaluators on a checkpoint of its workdir
  forward   run a checkpoint on inputs from an .npz file and write the outputs to another
  generate  continue prompts (text and images) with a checkpoint: greedy, temperature, top-k, top-p
  convert-hf  import a transformers (CLIP, SigLIP, LLaMA, Qwen2, Gemma, MPT, IDEFICS) or timm (NFNet) directory
  data      build (user JSONL -> ArrayRecord), stats (run the pipeline), train-tokenizer, builtin,
            fewshot (few-shot episodes on real images shipped with scikit-learn / scikit-image),
            tfds (prepare the built-in tasks or `data build` folders as TFDS datasets)
  plan      per-device memory (parameters, optimizer state, gradients, activations) of a config on a mesh

`vlm-jax COMMAND --help` lists a command's flags."""


def _parse_config_flags(argv: list[str], extra: dict[str, str]):
    """Loads `--config path[:arg]`, then parses `--config.x=y` overrides and string flags with absl."""
    from vlm_jax.config_lib import load_config
    from vlm_jax.errors import ConfigError

    rest, spec = [], None
    args = iter(argv)
    for a in args:
        if a == "--config":
            spec = next(args, None)
        elif a.startswith("--config="):
            spec = a.split("=", 1)[1]
        else:
            rest.append(a)
    if not spec:
        raise ConfigError("--config is required, e.g. --config configs/lm.py:variant=tiny")
    return _override_flags(load_config(spec), rest, extra)


def _override_flags(config, rest: list[str], extra: dict[str, str]):
    """absl flag values of `rest`: `--config.key=value` overrides applied to `config` (as `.config`), and the
    string flags named in `extra`."""
    from absl import flags
    from ml_collections import config_flags

    from vlm_jax.errors import ConfigError

    fv = flags.FlagValues()
    rest = ["vlm-jax"] + rest
    for name, help_text in extra.items():
        flags.DEFINE_string(name, None, help_text, flag_values=fv)
    try:
        config_flags.DEFINE_config_dict("config", config, flag_values=fv, lock_config=True, sys_argv=rest)
        leftover = fv(rest)[1:]
    except (AttributeError, KeyError) as e:  # an override of a key the config lacks
        detail = str(e).strip("'\"").replace("\\'", "'").replace("\\n", "; ")
        raise ConfigError(f"a --config override names a key the config does not have ({detail}).") from None
    except flags.UnrecognizedFlagError as e:
        import difflib

        close = difflib.get_close_matches(e.flagname, [n for n in fv if "." not in n], n=1)
        tip = f" (did you mean --{close[0]}?)" if close else ""
        raise ConfigError(f"--{e.flagname} is not a flag of this command{tip}.") from None
    except flags.Error as e:
        raise ConfigError(str(e).rstrip(".") + ".") from None
    if leftover:  # e.g. a value after a flag that took none, or a stray word: never silently ignored
        raise ConfigError(f"unexpected argument {leftover[0]!r}: flags are --name=value (or --name value).")
    return fv


def _join_run(flag_values) -> None:
    """Initialises JAX's distributed runtime from the --coordinator_address / --num_processes / --process_id
    flags (argparse namespace or absl flag values) or from the detected cluster (`vlm_jax.distributed`)."""
    distributed.initialize(*(getattr(flag_values, name) for name in distributed.FLAGS))


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    for name, help_text in distributed.FLAGS.items():
        parser.add_argument(f"--{name}", help=help_text)


def cmd_train(argv: list[str]) -> int:
    """`vlm-jax train`: returns the exit status."""
    if "--help" in argv or "-h" in argv:
        print(
            "usage: vlm-jax train --config configs/X.py[:arg] --workdir DIR [--config.key=value ...]\n"
            "       [--coordinator_address HOST:PORT --num_processes N --process_id I]\n"
            "The last three join a multi-process run (launch/local.py passes them); under SLURM and on Cloud TPU "
            "pods the processes find each other by themselves (docs/scaling.md)."
        )
        return 0
    fv = _parse_config_flags(argv, {"workdir": "where checkpoints, logs and TensorBoard files go", **distributed.FLAGS})
    if not fv.workdir:
        raise SystemExit("vlm-jax train: --workdir is required.")
    _join_run(fv)
    from vlm_jax.train import trainer

    result = trainer.train(fv.config, fv.workdir)
    if result.stopped_by_signal is not None:
        return 128 + result.stopped_by_signal
    if distributed.is_main():
        print(f"Outputs (checkpoints, config.json, TensorBoard logs) are in {os.path.abspath(fv.workdir)}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    """`vlm-jax eval`: the evaluators of a config on a checkpoint of its workdir."""
    if "--help" in argv or "-h" in argv:
        print(
            "usage: vlm-jax eval --config configs/X.py[:arg] --workdir DIR [--checkpoint STEP] [--config.key=value ...]"
        )
        return 0
    fv = _parse_config_flags(
        argv,
        {"workdir": "the training workdir", "checkpoint": "step to evaluate (default: latest)", **distributed.FLAGS},
    )
    if not fv.workdir:
        raise SystemExit("vlm-jax eval: --workdir is required.")
    _join_run(fv)
    import json

    from vlm_jax import prerequisites
    from vlm_jax.train import trainer
    from vlm_jax.train.checkpoint import Checkpointer, SavedParams

    ckpt = Checkpointer(fv.workdir, async_save=False)
    step = int(fv.checkpoint) if fv.checkpoint else ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{fv.workdir} holds no complete checkpoint.")
    # The evaluation data is built if missing; prerequisite runs are never trained: the checkpoint holds every weight.
    config = prerequisites.resolve(fv.config, train=False)
    ckpt.close()
    run = trainer.Trainer(config)
    # Only the params are read (no optimizer state), each device its own shards of the trainer's shardings.
    params = SavedParams(os.path.join(fv.workdir, "checkpoints", str(step))).restore(run.abstract_state.params)
    metrics = trainer.evaluate(run, params)
    from vlm_jax.report import write_report

    if not distributed.is_main():  # the metrics are global sums, the same on every process; process 0 reports
        return 0
    samples = getattr(run.system, "eval_samples", [])
    path = write_report(fv.workdir, config, {f"eval/{k}": v for k, v in metrics.items()}, samples)
    print(f"Report: {path}")
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}")
    print(json.dumps({"step": step, **metrics}))  # the last line is JSON
    return 0


# `vlm-jax forward` inputs that hold token ids (or masks and sizes): integers (masks may be bool), and inputs that
# hold pixels: real numbers. The systems' own `forward` checks the ranks, the vocabulary and their own inputs.
_ID_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "image_attention_mask", "image_sizes")
_ID_INPUTS += ("image_grid_thw", "video_grid_thw", "pixel_attention_mask", "image_patches_indices")
_MASK_INPUTS = ("attention_mask", "token_type_ids")  # [batch, length], like input_ids


def _forward_inputs(path: str) -> dict:
    """The arrays of a `vlm-jax forward --inputs` file, after one-sentence UserErrors for a file that is missing,
    a folder or not an .npz archive, an array of Python objects, ids that are not integers, pixels that are not
    finite real numbers, an empty input_ids, and masks whose shape is not input_ids'."""
    import zipfile

    import numpy as np

    from vlm_jax.errors import UserError

    if os.path.isdir(path):
        raise UserError(f"--inputs {path} is a folder; give an .npz file (numpy.savez).")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the inputs file {path} does not exist.")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"the inputs file {path} is not an .npz archive written by numpy.savez ({e}).") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UserError(f"the inputs file {path} holds one array, not named arrays; write it with numpy.savez.")
    inputs = {}
    with loaded:
        for name in loaded.files:
            try:
                inputs[name] = loaded[name]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise UserError(f"the input {name} of {path} cannot be read as a numeric array ({e}).") from None
    for name, value in inputs.items():
        kind = value.dtype.kind
        if name in _ID_INPUTS and kind not in "iub":
            raise UserError(f"{name} must hold integers; got dtype {value.dtype}.")
        if ("pixel" in name or "patches" in name) and name not in _ID_INPUTS:
            if kind not in "iuf":
                raise UserError(f"{name} must hold real numbers; got dtype {value.dtype}.")
            if kind == "f" and not np.isfinite(value).all():
                raise UserError(f"{name} holds NaN or infinite values.")
    ids = inputs.get("input_ids")
    if ids is not None and ids.ndim == 2:
        if ids.size == 0:
            raise UserError(f"input_ids is empty (shape {ids.shape}); give at least one token in one row.")
        for name in _MASK_INPUTS:
            if name in inputs and inputs[name].shape != ids.shape:
                raise UserError(f"{name} has shape {inputs[name].shape}; it must have input_ids' shape {ids.shape}.")
        positions = inputs.get("position_ids")
        if positions is not None and positions.shape[-2:] != ids.shape:
            raise UserError(
                f"position_ids has shape {positions.shape}; its last two axes must be input_ids' {ids.shape}."
            )
    return inputs


def cmd_forward(argv: list[str]) -> int:
    """`vlm-jax forward`: checkpoint + inputs npz -> outputs npz."""
    parser = argparse.ArgumentParser(
        prog="vlm-jax forward", description="Runs a checkpoint on transformers-style inputs."
    )
    parser.add_argument("--checkpoint", required=True, help="a workdir (latest step) or a step directory")
    parser.add_argument("--inputs", required=True, help=".npz with input_ids [, attention_mask, ...]")
    parser.add_argument("--out", required=True, help=".npz to write (logits, or embeddings for dual encoders)")
    parser.add_argument("--mesh", help=MESH_HELP)
    _add_distributed_flags(parser)
    args = parser.parse_args(argv)
    _join_run(args)
    import numpy as np

    from vlm_jax.train.checkpoint import load_params

    inputs = _forward_inputs(args.inputs)
    config, system, params = load_params(args.checkpoint, args.mesh)
    outputs = system.forward(params, inputs)
    if not distributed.is_main():  # every process computed the same outputs; process 0 writes them
        return 0
    np.savez(args.out, **outputs)
    print(f"Wrote {', '.join(f'{k} {v.shape}' for k, v in outputs.items())} to {args.out}")
    return 0


MESH_HELP = (
    "the mesh the params are read onto, sharded by the checkpoint's logical_axis_rules, e.g. fsdp=8 or "
    "fsdp=4,tensor=2 (default: the checkpoint's mesh, fitted to the devices here)"
)


def _token_id(token: str | int, tokenizer) -> int:
    """A stop token given as an id or as a piece of the tokenizer."""
    from vlm_jax.errors import UserError

    if isinstance(token, int) or token.lstrip("-").isdigit():
        return int(token)
    if tokenizer is None:
        raise UserError(f"the stop token {token!r} is a piece, but no tokenizer is known (give --tokenizer or ids).")
    try:
        return tokenizer.token_id(token)
    except KeyError as e:
        raise UserError(str(e).strip("'\"")) from None


def cmd_generate(argv: list[str]) -> int:
    """`vlm-jax generate`: a checkpoint continues one prompt (--prompt, --image) or a JSONL batch of them."""
    parser = argparse.ArgumentParser(prog="vlm-jax generate", description="Continues prompts with a checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a workdir (latest step) or a step directory")
    parser.add_argument(
        "--prompt", help="one prompt, rendered as the user's turn by the system's template; <image> marks each --image"
    )
    parser.add_argument("--image", action="append", default=[], help="an image of --prompt (repeat for several)")
    parser.add_argument("--prompts", help='a batch, JSONL: {"text": "<image>A photo of", "images": ["a.png"]}')
    parser.add_argument("--out", help="JSONL to write: tokens and text per prompt (default: print the texts)")
    parser.add_argument("--tokenizer", help="SentencePiece model (default: the config's data.tokenizer)")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0 = off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    parser.add_argument(
        "--stop",
        default="",
        help="comma-separated stop tokens (ids or pieces; default: the system template's: eos, <|endofchunk|>, ...)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mesh", help=MESH_HELP)
    _add_distributed_flags(parser)
    args = parser.parse_args(argv)
    _join_run(args)
    import json

    from vlm_jax import generate
    from vlm_jax.errors import UserError
    from vlm_jax.train.checkpoint import load_params

    if bool(args.prompt) == bool(args.prompts):
        raise UserError("give either --prompt (with its --image flags) or --prompts FILE.jsonl.")
    if args.prompts and os.path.isdir(args.prompts):
        raise UserError(f"--prompts {args.prompts} is a folder; give the JSONL file itself.")
    if args.prompts and not os.path.isfile(args.prompts):
        raise FileNotFoundError(f"the prompts file {args.prompts} does not exist.")
    config, system, params = load_params(args.checkpoint, args.mesh)
    tokenizer_path = args.tokenizer or config.get("data", {}).get("tokenizer")
    tokenizer = None
    if tokenizer_path:
        from data_pipelines.tokenizer import Tokenizer

        tokenizer = Tokenizer(tokenizer_path)
    if args.stop:
        stop = [_token_id(s, tokenizer) for s in args.stop.split(",") if s]
    elif tokenizer is not None and config.get("data", {}).get("template"):
        stop = list(system.stop_tokens(tokenizer))  # the template's end of an answer, e.g. <|endofchunk|> and eos
    else:
        stop = [tokenizer.eos_id] if tokenizer else []
    fmt = generate.PromptFormat.of(system, tokenizer)
    if args.prompt:
        item = {"text": args.prompt, "images": args.image}
        prompts = [generate.parse_prompt(item, fmt, "--prompt", os.getcwd())]
    else:
        prompts = generate.read_prompts(args.prompts, fmt)
    settings = generate.Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, tuple(stop))
    batch = generate.batch_of(prompts, fmt)
    lines = []
    for row in generate.generate(system, params, batch, settings, args.seed):
        row = [int(t) for t in row if t != generate.PAD]
        lines.append({"tokens": row})
        if tokenizer is not None:
            lines[-1]["text"] = tokenizer.decode([t for t in row if t not in stop])  # without the stop token
    if not distributed.is_main():  # every process generated the same rows; process 0 prints or writes them
        return 0
    if not args.out:
        for line in lines:
            print(line.get("text", line["tokens"]))
        return 0
    with open(args.out, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    print(f"Wrote {len(lines)} generations to {args.out}")
    return 0


def cmd_data(argv: list[str]) -> int:
    """`vlm-jax data build|builtin|fewshot|stats|tfds|train-tokenizer`."""
    usage = "usage: vlm-jax data build|builtin|fewshot|stats|tfds|train-tokenizer [flags]   (vlm-jax data SUBCOMMAND --help)"
    if not argv or argv[0] not in ("build", "builtin", "fewshot", "stats", "tfds", "train-tokenizer"):
        print(usage, file=sys.stderr)
        return 2
    sub, rest = argv[0], argv[1:]
    if sub == "build":
        parser = argparse.ArgumentParser(prog="vlm-jax data build", description="User JSONL -> ArrayRecord shards.")
        parser.add_argument("--format", required=True, choices=["pairs", "llava", "interleaved"])
        parser.add_argument("--input", required=True, help="JSONL file (llava: also a JSON array file)")
        parser.add_argument("--out", required=True, help="output folder")
        parser.add_argument("--records_per_shard", type=int, default=10_000)
        args = parser.parse_args(rest)
        from data_pipelines import convert

        summary = convert.build(args.format, args.input, args.out, args.records_per_shard, progress=sys.stderr.isatty())
        print(convert.summary_text(summary, args.out))
        return 0
    if sub == "builtin":
        parser = argparse.ArgumentParser(
            prog="vlm-jax data builtin", description="Writes the procedural built-in dataset as ArrayRecord folders."
        )
        parser.add_argument("--out", required=True, help="output folder (one TASK/SPLIT folder each)")
        parser.add_argument("--image_size", type=int, default=64, help="image side in pixels (>= 40)")
        parser.add_argument("--scale", type=float, default=1.0, help="multiplies the default record counts")
        parser.add_argument("--seed", type=int, default=0)
        args = parser.parse_args(rest)
        from data_pipelines.builtin import build

        manifest = build.build(args.out, seed=args.seed, image_size=args.image_size, scale=args.scale)
        print(build.summary_text(manifest, args.out))
        return 0
    if sub == "fewshot":
        parser = argparse.ArgumentParser(
            prog="vlm-jax data fewshot",
            description="Writes few-shot episodes on real images (scikit-learn digits, scikit-image photos) as an "
            "ArrayRecord folder for the generative fewshot evaluation.",
        )
        parser.add_argument("--source", required=True, choices=["digits", "photos"])
        parser.add_argument("--out", required=True, help="output folder")
        parser.add_argument("--episodes", type=int, default=400, help="episodes; k cycles 0, 1, 2, 4")
        parser.add_argument("--image_size", type=int, default=64, help="image side in pixels (>= 8)")
        parser.add_argument("--seed", type=int, default=0)
        args = parser.parse_args(rest)
        from data_pipelines import real_images

        summary = real_images.write(args.source, args.out, args.episodes, args.seed, args.image_size)
        print(real_images.summary_text(summary, args.out))
        return 0
    if sub == "tfds":
        return _data_tfds(rest)
    if sub == "stats":
        if "--help" in rest or "-h" in rest:
            print(
                "usage: vlm-jax data stats --config CONFIG [--data DIR] [--split train] [--max_rows N] [--config.x=y]"
            )
            return 0
        fv = _parse_config_flags(
            rest,
            {
                "data": "a `data build` folder (overrides the config's)",
                "split": "train or validation",
                "max_rows": "stop after N rows",
            },
        )
        import json

        from data_pipelines.pipeline import data_stats
        from vlm_jax import prerequisites

        config = prerequisites.resolve(fv.config, train=False)  # builds the config's data if missing, trains nothing
        split = fv.split or "train"
        if fv.data:
            with config.unlocked():
                config.data.source = "array_record"
                config.data[f"{split}_path"] = fv.data
        stats = data_stats(config, split, int(fv.max_rows) if fv.max_rows else None)
        print(
            f"{stats['rows']} rows from {stats['records']} records; skipped: {stats['skipped'] or 'none'}; repaired: {stats['repaired'] or 'none'}"
        )
        print(json.dumps(stats))
        return 0
    parser = argparse.ArgumentParser(prog="vlm-jax data train-tokenizer", description="Trains a SentencePiece model.")
    parser.add_argument("--input", required=True, nargs="+", help="text files, one sentence or document per line")
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
    args = parser.parse_args(rest)
    from data_pipelines.tokenizer import train_tokenizer

    path = train_tokenizer(args.input, args.out, args.vocab_size, model_type=args.model_type)
    print(f"Wrote {path}")
    return 0


def _data_tfds(argv: list[str]) -> int:
    """`vlm-jax data tfds`: prepares built-in tasks or `data build` folders as TFDS datasets (no TensorFlow)."""
    import time

    from vlm_jax.errors import UserError

    parser = argparse.ArgumentParser(
        prog="vlm-jax data tfds",
        description="Prepares built-in tasks (TFDS builder vlm_jax_builtin) or `data build` folders "
        "(vlm_jax_records) as TFDS datasets in --data_dir, readable with data.source='tfds'.",
    )
    parser.add_argument("--data_dir", required=True, help="the TFDS data folder (data.tfds.data_dir)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--builtin", nargs="+", metavar="TASK", help="built-in tasks, e.g. captions vqa")
    what.add_argument("--name", help="the config name of `data build` folders: vlm_jax_records/NAME")
    parser.add_argument("--split", action="append", default=[], metavar="SPLIT=FOLDER", help="with --name")
    parser.add_argument("--scale", type=float, help="with --builtin: multiplies the default record counts (1.0)")
    parser.add_argument("--image_size", type=int, help="with --builtin: image side in pixels, >= 40 (64)")
    parser.add_argument("--seed", type=int, help="with --builtin (0)")
    args = parser.parse_args(argv)
    given = {k: getattr(args, k) for k in ("scale", "image_size", "seed") if getattr(args, k) is not None}
    if args.name:
        folders = dict(s.split("=", 1) for s in args.split if "=" in s)
        if not args.split or len(folders) != len(args.split) or given:
            raise UserError(
                "--name takes --split SPLIT=FOLDER for each split (e.g. --split train=data/train) and no "
                "--scale, --image_size or --seed."
            )
        from data_pipelines import tfds_records

        jobs = [lambda: tfds_records.prepare(args.name, folders, args.data_dir)]
    else:
        if args.split:
            raise UserError("--split goes with --name (the built-in tasks have their own splits).")
        from data_pipelines.builtin import tfds_builder

        options = {"scale": 1.0, "image_size": 64, "seed": 0, **given}
        jobs = [lambda task=task: tfds_builder.prepare(task, args.data_dir, **options) for task in args.builtin]
    for job in jobs:
        start = time.perf_counter()
        name, counts = job()
        splits = ", ".join(f"{split} {n}" for split, n in counts.items())
        print(f"{name} in {args.data_dir}: {splits} examples ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_convert_hf(argv: list[str]) -> int:
    """`vlm-jax convert-hf`: transformers / timm directory -> vlm_jax checkpoint."""
    parser = argparse.ArgumentParser(prog="vlm-jax convert-hf", description="Imports a public checkpoint directory.")
    parser.add_argument(
        "--hf_dir",
        required=True,
        help="config.json + *.safetensors (transformers or timm format); PyTorch pickles (.bin, .pt, .pth) are "
        "never loaded, as unpickling can run code",
    )
    parser.add_argument("--out", required=True, help="output directory (readable by --checkpoint)")
    args = parser.parse_args(argv)
    from vlm_jax.interop.convert import convert

    config = convert(args.hf_dir, args.out)
    print(f"Converted {args.hf_dir} ({config.model.name}) to {os.path.abspath(args.out)}")
    return 0


PLAN_HOST_DEVICES = 64  # `vlm-jax plan` asks XLA for up to this many host CPU devices to compile a mesh on
PLAN_USAGE = (
    "usage: vlm-jax plan --config configs/X.py[:arg] --mesh data=N,fsdp=M,tensor=K [--devices N] "
    "[--device_memory_gb G] [--config.key=value ...]"
)


def _plan_host_devices(argv: list[str]) -> None:
    """Before jax is imported: asks XLA for as many host CPU devices as the --mesh of `vlm-jax plan` has (at most
    PLAN_HOST_DEVICES), so its train step can be compiled for that mesh on CPU (or, for a bigger mesh, for as
    large a part of it as can be). Does nothing if jax is already imported, XLA_FLAGS already sets a host
    device count, or the mesh's size is not known from the flags."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules or "xla_force_host_platform_device_count" in flags:
        return
    values = {}
    for i, a in enumerate(argv):
        for name in ("mesh", "devices"):
            if a == f"--{name}" and i + 1 < len(argv):
                values[name] = argv[i + 1]
            elif a.startswith(f"--{name}="):
                values[name] = a.split("=", 1)[1]
    try:
        sizes = [int(item.split("=")[1]) for item in values["mesh"].split(",") if item.strip()]
        n = int(values["devices"]) if "devices" in values else math.prod(sizes)  # negative with a -1 axis
    except (KeyError, IndexError, ValueError):
        return  # plan itself reports a malformed mesh or device count
    if n > 1:  # a bigger mesh is estimated from a compile on PLAN_HOST_DEVICES devices
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={min(n, PLAN_HOST_DEVICES)}".strip()


def cmd_plan(argv: list[str]) -> int:
    """`vlm-jax plan`: per-device bytes of parameters, optimizer state, gradients and activations of a config's
    train step on a mesh, and whether they fit (vlm_jax/plan.py); the last line is one JSON object."""
    if "--help" in argv or "-h" in argv:
        print(PLAN_USAGE)
        return 0
    _plan_host_devices(argv)
    fv = _parse_config_flags(
        argv,
        {
            "mesh": "the target mesh, e.g. data=2,fsdp=8,tensor=4 (default: the config's)",
            "devices": "the target's device count (default: the mesh's product; needed where the mesh has a -1)",
            "device_memory_gb": "memory of one target device in GB (default: the local device's, if known)",
        },
    )
    from vlm_jax import plan
    from vlm_jax.errors import UserError

    def number(flag: str, kind: type):
        value = getattr(fv, flag)
        try:
            return None if value is None else kind(value)
        except ValueError:
            kind_name = "an integer" if kind is int else "a number"
            raise UserError(f"--{flag} is {value!r}, which is not {kind_name}.") from None

    result = plan.plan(fv.config, fv.mesh, number("devices", int), number("device_memory_gb", float))
    print("\n".join(plan.report_lines(result)))
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "forward": cmd_forward,
    "generate": cmd_generate,
    "convert-hf": cmd_convert_hf,
    "data": cmd_data,
    "plan": cmd_plan,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vlm-jax` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from vlm_jax.errors import UserError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (UserError, FileNotFoundError) as e:
        print(f"vlm-jax {argv[0]}: {distributed.process_label()}{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
