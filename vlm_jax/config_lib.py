"""Config helpers: `parse_arg` for `get_config(arg)` strings, loading, and `validate`.

`validate` turns every inconsistency we can detect before compiling into one
`ConfigError` with one clear sentence.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any, Iterable

import ml_collections

from vlm_jax import sharding
from vlm_jax.errors import ConfigError  # defined there; configs/*.py import it from here

ConfigDict = ml_collections.ConfigDict


def parse_arg(arg: str | None, **defaults: Any) -> ConfigDict:
    """Parses a config argument such as `"variant=tiny,res=224"` against typed defaults.

    Values are converted to the type of their default (bools accept
    true/false/1/0; a bare name means True). Unknown names are an error, so a
    typo never silently falls back to a default.
    """
    result = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if name not in defaults:
            raise ConfigError(f"config argument {name!r} is not one of {sorted(defaults)}.")
        default = defaults[name]
        if not sep:
            value: Any = True
        elif isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"config argument {name}={raw!r} is not a boolean.")
            value = raw.lower() in ("true", "1")
        elif isinstance(default, (int, float)):
            try:
                value = type(default)(ast.literal_eval(raw))
            except (ValueError, SyntaxError):
                raise ConfigError(f"config argument {name}={raw!r} is not a number.") from None
        else:
            value = raw
        result[name] = value
    return ConfigDict(result)


def load_config(spec: str) -> ConfigDict:
    """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
    import importlib.util
    import os

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"the config file {path} does not exist.")
    module_spec = importlib.util.spec_from_file_location(f"vlm_jax_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"the config file {path} defines no get_config(arg).")
    config = module.get_config(arg or None)
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"get_config in {path} returned a {type(config).__name__}, not an ml_collections ConfigDict.")
    return config


def training_config(total_steps: int, batch_size: int, mesh: str = "data=-1,fsdp=1,tensor=1") -> ConfigDict:
    """A config with the top-level keys every training config has (docs/design.md), at the usual values: log
    every 10 steps, a checkpoint every 1000 (3 kept), no periodic evaluation; a system config adds `model`,
    `data` and `optim`."""
    c = ConfigDict()
    c.seed = 0
    c.total_steps = total_steps
    c.batch_size = batch_size
    c.grad_accum_steps = 1
    c.mesh = mesh
    c.logical_axis_rules = sharding.DEFAULT_RULES
    c.log_every = 10
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.max_consecutive_nonfinite = 10  # skipped non-finite updates in a row that stop the run; 0 = never
    c.schedule_steps = 0  # the learning-rate schedule's length; 0 = total_steps
    c.eval_every = 0
    c.eval_steps = 2
    c.peak_tflops = 0.0  # per device; 0 = spec-sheet table, else measured
    return c


def module_defaults(module: type, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The settings of a Flax module (a dataclass) whose default is a bool, int, float, str or tuple, with that
    default: a config lists them so every option of the module is a `--config.` key (None cannot be overridden
    from the command line) while its default stays written once, in the module."""
    import dataclasses

    skip = {"parent", "name", *exclude}
    return {
        f.name: f.default
        for f in dataclasses.fields(module)
        if f.name not in skip and isinstance(f.default, (bool, int, float, str, tuple))
    }


def compute_dtype(*parts: dict[str, Any], tiny: bool) -> ml_collections.FieldReference:
    """One activation dtype shared by the `dtype` key of every model part in `parts` (a FieldReference, so
    `--config.model.lm.dtype=float32` changes them all): float32 for tiny test models, bfloat16 for paper sizes.
    Either way parameters, optimizer state, logits, softmaxes and the loss stay float32 and matmuls accumulate
    in float32 (`vlm_jax/nn/layers.py`, `matmul`)."""
    dtype = ml_collections.FieldReference("float32" if tiny else "bfloat16")
    for part in parts:
        part["dtype"] = dtype
    return dtype


def to_json(config: ConfigDict) -> str:
    """The config as JSON (what checkpoints store beside the state)."""
    return config.to_json_best_effort(sort_keys=True, indent=2)


def from_json(text: str) -> ConfigDict:
    """Inverse of `to_json` (tuples come back as lists)."""
    return ConfigDict(json.loads(text))


def validate(config: ConfigDict, num_devices: int, resolved: bool = True) -> None:
    """Checks a training config against the registry, the device count, its image and sequence sizes, and (once
    resolved) its vocabulary against its special-token ids, its tokenizer and the checkpoints it starts from; the
    first problem found is a ConfigError of one sentence. Reads no array and compiles nothing.

    `resolved=False` checks a config before `prerequisites.resolve` (so before any prerequisite is built or
    trained): everything that does not need the tokenizer or other runs' outputs, in the config and in the
    config of every `run` prerequisite it declares."""
    from vlm_jax import models  # local: loading a config should not import every system

    required = (
        "seed",
        "total_steps",
        "batch_size",
        "mesh",
        "log_every",
        "checkpoint_every",
        "eval_every",
        "model",
        "data",
        "optim",
    )
    missing = [k for k in required if k not in config]
    if missing:
        raise ConfigError(f"the config has no {', '.join(missing)} (every training config needs these top-level keys).")
    from vlm_jax import prerequisites  # local: it imports this module

    if resolved:
        prerequisites.check_resolved(config)
    else:
        for name, spec in (config.get("prerequisites") or {}).items():
            if spec.get("kind") == "run" and isinstance(spec.get("config"), ConfigDict):
                try:
                    validate(spec.config, num_devices, resolved=False)
                except ConfigError as e:
                    raise ConfigError(f"the prerequisite run {name!r}: {e}") from None
    models.get(config.model.name)  # raises ConfigError naming the known systems
    try:
        shape = sharding.mesh_shape(config.mesh, num_devices)
    except sharding.ShardingError as e:
        raise ConfigError(str(e)) from None
    rules = config.get("logical_axis_rules", sharding.DEFAULT_RULES)
    dp = math.prod(shape[a] for a in _batch_axes(rules, shape))
    accum = int(config.get("grad_accum_steps", 1))
    if accum < 1:
        raise ConfigError(f"grad_accum_steps is {accum}; it must be at least 1.")
    if config.batch_size % (dp * accum):
        raise ConfigError(
            f"batch_size={config.batch_size} is not divisible by the data-parallel size {dp}"
            + (f" times grad_accum_steps={accum}" if accum > 1 else "")
            + f" (mesh {config.mesh!r})."
        )
    if config.total_steps < 1:
        raise ConfigError(f"total_steps is {config.total_steps}; it must be at least 1.")
    for key in ("log_every", "checkpoint_every", "eval_every"):
        if config[key] < 0:
            raise ConfigError(f"{key} is {config[key]}; use a positive number of steps, or 0 to turn it off.")
    rules = [p for p, _ in config.optim.get("lr_mults", ())] + [p for p, _ in config.optim.get("trainable_rows", ())]
    for pattern in list(config.optim.get("freeze", ())) + rules:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"optim pattern {pattern!r} is not a valid regular expression ({e}).") from None
    _check_patch_sizes(config.model, "model")
    _check_sequence_room(config)
    if resolved:
        _check_vocabulary(config)
    else:
        check_patterns_abstractly(config)


def _batch_axes(rules: Iterable, shape: dict[str, int]) -> tuple[str, ...]:
    for name, target in rules:
        if name == "batch":
            axes = (target,) if isinstance(target, str) else tuple(target or ())
            return tuple(a for a in axes if a in shape)
    return ()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# (patch size, image size) of published models whose image is not a whole number of patches: their ViT crops the
# rest, and so does ours; any other such pair is a mistake.
PUBLISHED_CROPS = {
    (14, 384): "SigLIP So400m/14 at 384 px (google/siglip-so400m-patch14-384: 27 x 27 patches, 6 pixels cut)",
}


def _check_patch_sizes(node: Any, where: str) -> None:
    """Every part under `node` (`model`) with an `image_size` and a patch size (its `patch_size`, or a ViT
    `variant` such as "L/14") must cut its images into whole patches, as a ViT silently crops the rest (except the
    published models of `PUBLISHED_CROPS`, which were trained so)."""
    if not isinstance(node, ConfigDict):
        return
    size = node.get("image_size")
    if _is_int(size) and size > 0:
        patch, named = node.get("patch_size"), f"{where}.patch_size"
        variant = node.get("variant")
        if patch is None and isinstance(variant, str) and "/" in variant:
            from vlm_jax.encoders.vit import decode_variant
            from vlm_jax.errors import UserError

            try:
                patch, named = decode_variant(variant)["patch_size"], f"{where}.variant={variant!r}"
            except UserError:
                patch = None  # a malformed variant is the ViT's own one-sentence error
        if _is_int(patch) and patch > 0 and size % patch and (patch, size) not in PUBLISHED_CROPS:
            lower = size - size % patch
            fits = f"{lower} or {lower + patch}" if lower else str(patch)
            raise ConfigError(
                f"{where}.image_size={size} is not a multiple of the patch size {patch} ({named}), so the last "
                f"{size % patch} pixel rows and columns of every image would be cut off; use an image size such as "
                f"{fits}."
            )
    for key in node.keys():
        _check_patch_sizes(node[key], f"{where}.{key}")


def _check_sequence_room(config: ConfigDict) -> None:
    """A packed row (`data.seq_len`, and the interleaved documents' window) must hold one image's placeholder
    tokens (`model.image_tokens`) and some text; else the fitting rules drop every image of every example."""
    tokens = config.model.get("image_tokens")
    data = config.get("data")
    if not (_is_int(tokens) and tokens > 0 and isinstance(data, ConfigDict)):
        return
    window = data.get("interleaved")
    for key, length in (
        ("data.seq_len", data.get("seq_len")),
        ("data.interleaved.max_tokens", window.get("max_tokens") if isinstance(window, ConfigDict) else None),
    ):
        if _is_int(length) and length <= tokens:
            raise ConfigError(
                f"{key}={length} is too short for the {tokens} placeholder tokens of one image "
                f"(model.image_tokens) plus any text, so every image would be dropped from every example; "
                f"make {key} larger than {tokens} or the image's token count smaller."
            )


# Where a system config keeps the vocabulary size of its LM (or text tower), first match wins.
VOCAB_KEYS = ("model.lm.vocab_size", "model.vocab_size", "model.text.vocab_size")


def vocabulary(config: ConfigDict) -> tuple[str, int] | None:
    """(dotted key, value) of the vocabulary size (embedding rows) of `config`'s LM or text tower, if it has one."""
    for key in VOCAB_KEYS:
        value = _lookup(config, key)
        if _is_int(value):
            return key, value
    return None


def _token_ids(node: Any, where: str, vocab: tuple[str, int] | None):
    """(dotted key, id, (vocab key, size)) of every special-token id under `node`: keys ending in `_id` (or `_ids`,
    a tuple of ids), each with the vocabulary of its nearest part that has a `vocab_size`; -1 means none."""
    if not isinstance(node, ConfigDict):
        return
    if _is_int(node.get("vocab_size")):
        vocab = (f"{where}.vocab_size", node.vocab_size)
    for key in node.keys():
        value = node[key]
        if key == "eos_token_id" and node.get("pool", "eos") != "eos":
            continue  # a text tower's eos id is read only to pool at the eos token (SigLIP pools the last one)
        if key.endswith("_id") and _is_int(value) and value >= 0:
            yield f"{where}.{key}", value, vocab
        elif key.endswith("_ids") and isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                if _is_int(v) and v >= 0:
                    yield f"{where}.{key}[{i}]", v, vocab
        else:
            yield from _token_ids(value, f"{where}.{key}", vocab)


def check_tokenizer(tokenizer: Any, rows: int, where: str, tokenizer_name: str) -> None:
    """A ConfigError unless every id of `tokenizer` (a `data_pipelines.tokenizer.Tokenizer`: its base pieces and
    the special tokens it appends) has one of the `rows` embedding rows that `where` names."""
    n = tokenizer.vocab_size
    if n > rows:
        added = len(tokenizer.added_tokens)
        parts = f"{n - added} pieces and {added} special tokens it appends" if added else f"{n} pieces"
        raise ConfigError(
            f"the tokenizer {tokenizer_name} has {n} ids ({parts}) but {where} has {rows} embedding rows, so ids "
            f"{rows} to {n - 1} would have no embedding: use the tokenizer the model was trained with, or a "
            f"vocabulary of at least {n} (configs read it from the tokenizer with from_tokenizer)."
        )


def _saved_config(path: str) -> ConfigDict:
    """The config a checkpoint (`--checkpoint`-style path) was written with (JSON only: no array is read)."""
    from vlm_jax.train import checkpoint

    workdir, step = checkpoint.resolve(path)
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    try:
        return ckpt.config(step)
    finally:
        ckpt.close()


def _check_vocabulary(config: ConfigDict) -> None:
    """Special-token ids lie inside the vocabulary; the tokenizer (`data.tokenizer`) has no id beyond it; and the
    checkpoints the model starts from (`model.lm_checkpoint`, `model.stage_checkpoint`) have as many embedding rows
    as the config's vocabulary."""
    import os

    vocab = vocabulary(config)
    for key, token, (vocab_key, size) in (
        (k, t, v) for k, t, v in _token_ids(config.model, "model", vocab) if v is not None
    ):
        if token >= size:
            raise ConfigError(
                f"{key} is {token}, outside the vocabulary of {vocab_key}={size}: the vocabulary must be larger than "
                "every special-token id (raise the vocab_size, or read ids and size from the tokenizer)."
            )
    if vocab is None:
        return
    data = config.get("data")
    path = data.get("tokenizer") if isinstance(data, ConfigDict) else None
    tokenizer = None
    if isinstance(path, str) and path and os.path.isfile(path):
        from data_pipelines.tokenizer import Tokenizer

        tokenizer = Tokenizer(path)
        check_tokenizer(tokenizer, vocab[1], vocab[0], path)
    for key in ("lm_checkpoint", "stage_checkpoint"):
        where = config.model.get(key)
        if not (isinstance(where, str) and where and os.path.isdir(where)):
            continue  # none, or not there yet: the system's `pretrained` names a missing one
        saved = vocabulary(_saved_config(where))
        if saved is not None and saved[1] != vocab[1]:
            source = (
                f" (the tokenizer {path}'s {tokenizer.vocab_size} ids)"
                if tokenizer is not None and tokenizer.vocab_size == vocab[1]
                else ""
            )
            raise ConfigError(
                f"model.{key} {where} has a vocabulary of {saved[1]} embedding rows but {vocab[0]} is {vocab[1]}"
                f"{source}: give the tokenizer that checkpoint was trained with, or set {vocab[0]}={saved[1]}."
            )


def parameter_paths(system: Any) -> list[str]:
    """The parameter paths ("decoder/layers/attn/query/kernel", ...) of a built system, from `jax.eval_shape` of its
    init: nothing is allocated or compiled."""
    import jax
    from flax import traverse_util

    from vlm_jax.train.optimizer import path_str

    boxed = jax.eval_shape(system.init, jax.random.key(0), system.dummy_batch(1))
    return [path_str(k) for k in traverse_util.flatten_dict(sharding.logical_names(boxed))]


def check_patterns_abstractly(config: ConfigDict) -> None:
    """`validate_patterns` of a config not yet resolved, on the parameter paths of its system's abstract init
    (`parameter_paths`), so a freeze pattern that matches nothing is named before any prerequisite is trained.
    A vocabulary still to be read from the tokenizer stands at a placeholder size (paths do not depend on it);
    a config whose system cannot be built before it is resolved is left to the trainer's own check."""
    from vlm_jax import models
    from vlm_jax.errors import UserError

    if not any(config.optim.get(k) for k in ("freeze", "lr_mults", "trainable_rows")):
        return
    plain = config.to_dict()
    for key, what in plain.get("from_tokenizer") or ():
        *parents, leaf = key.split(".")
        node = plain
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if what == "vocab_size" and isinstance(node, dict) and leaf in node:
            node[leaf] = 1024
    try:
        paths = parameter_paths(models.build(ConfigDict(plain)))
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - e.g. a setting only the resolved config has; the trainer checks it then
        return
    validate_patterns(config, paths)


def validate_patterns(config: ConfigDict, param_paths: list[str]) -> None:
    """Every freeze / lr-multiplier / trainable-rows regex must match at least one parameter path."""
    for key, patterns in (
        ("optim.freeze", config.optim.get("freeze", ())),
        ("optim.lr_mults", [p for p, _ in config.optim.get("lr_mults", ())]),
        ("optim.trainable_rows", [p for p, _ in config.optim.get("trainable_rows", ())]),
    ):
        for pattern in patterns:
            if not any(re.fullmatch(pattern, path) for path in param_paths):
                example = ", ".join(param_paths[:4])
                raise ConfigError(f"{key} pattern {pattern!r} matches no parameter (paths look like: {example}, ...).")
    frozen = [p for p in param_paths if any(re.fullmatch(f, p) for f in config.optim.get("freeze", ()))]
    if len(frozen) == len(param_paths):
        raise ConfigError("optim.freeze matches every parameter, so there is nothing to train.")


# Keys that fix the shapes and structure of a checkpointed train state.
_STRUCTURAL_KEYS = ("model", "optim.name", "optim.freeze")


def validate_checkpoint_config(saved: ConfigDict, given: ConfigDict, where: str) -> None:
    """A checkpoint can be resumed only with the same model and optimizer structure."""
    for key in _STRUCTURAL_KEYS:
        a, b = _lookup(saved, key), _lookup(given, key)
        if _normalise(a) != _normalise(b):
            diff = _first_difference(_normalise(a), _normalise(b), key)
            raise ConfigError(
                f"the checkpoint in {where} was written with {diff[0]}={diff[1]!r} but the config gives {diff[2]!r}; "
                "use the same config to resume, or a new --workdir."
            )


def _lookup(config: ConfigDict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    return node


def _normalise(x: Any) -> Any:
    if isinstance(x, ConfigDict):
        x = x.to_dict()
    if isinstance(x, dict):
        return {k: _normalise(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_normalise(v) for v in x]
    return x


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}")
    return path, a, b
