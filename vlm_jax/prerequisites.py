"""Prerequisites: the data builds and training runs a config needs, declared in it and resolved when it runs.

Loading a config is pure: it builds nothing, trains nothing and reads no file. A config that needs a
built dataset or another run's checkpoint declares it under `config.prerequisites`, one entry per name,
and refers to it anywhere else (data paths, `eval_tasks`, `model.lm_checkpoint`, the config of another
prerequisite run) by a symbolic path, `prerequisite:NAME` or `prerequisite:NAME/sub/folder`. Kinds:

  builtin_data  the built-in dataset, `data_pipelines.builtin.build.ensure(seed, image_size, scale)`
  real_images   few-shot episodes on packaged real images,
                `data_pipelines.real_images.ensure(source, episodes, seed, image_size)`
  run           a training run (a pretrained LM, vision encoder or a stage-1 checkpoint): `config` (a
                whole training config, which may refer to the other prerequisites) and `workdir` (a path
                prefix: the run lives in WORKDIR-HASH, HASH a digest of its resolved config)

`resolve(config)` returns a new config in which every symbolic path is a concrete folder and the keys
listed in `from_tokenizer` hold their values. It resolves only the prerequisites the config refers to,
each once and cached (`build.cached`: a folder appears complete or not at all), so the first call builds
or trains and later calls only return paths. `resolve(config, train=False)` (`vlm-jax eval`, `vlm-jax
data stats`) builds data but never trains: a run resolves to the folder it has or would have (evaluating
needs only the trained checkpoint, which holds every weight). The trainer resolves its config when
training starts; the resolved config is what it saves beside the checkpoints, with each resolved
prerequisite's folder recorded as `prerequisites.NAME.path`.

`from_tokenizer` = ((dotted key, what), ...) sets keys from the file `data.tokenizer` names (which may be
a prerequisite's, existing only once built): what is "vocab_size", "eos_id", a piece (its id) or a tuple
of pieces (their ids); a numeric key part indexes a tuple (`optim.trainable_rows.0.1`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from ml_collections import ConfigDict

from vlm_jax import config_lib
from vlm_jax.errors import ConfigError

PREFIX = "prerequisite:"
# kind -> the settings an entry may have besides `kind` (and `path`, which `resolve` writes)
KINDS = {
    "builtin_data": ("seed", "image_size", "scale"),
    "real_images": ("source", "episodes", "seed", "image_size"),
    "run": ("config", "workdir"),
}


def resolve(config: ConfigDict, train: bool = True) -> ConfigDict:
    """`config` with its prerequisites built (and, with `train`, trained) and referred to by concrete paths,
    and its `from_tokenizer` keys set; `config` itself is left unchanged."""
    plain = config.to_dict()
    declared = plain.pop("prerequisites", None) or {}
    resolver = _Resolver(declared, train)
    plain = resolver.substitute(plain, "config")
    plain = fill_from_tokenizer(plain)
    if declared:
        plain["prerequisites"] = {
            name: dict(spec, **({"path": resolver.paths[name]} if name in resolver.paths else {}))
            for name, spec in declared.items()
        }
    return ConfigDict(plain)


def check_resolved(config: ConfigDict) -> None:
    """Raises a ConfigError if `config` still has symbolic paths or `from_tokenizer` keys to fill."""
    plain = config.to_dict()
    plain.pop("prerequisites", None)
    if plain.get("from_tokenizer"):
        key = plain["from_tokenizer"][0][0]
        raise ConfigError(
            f"{key} is still to be read from the tokenizer: resolve the config first "
            "(vlm_jax.prerequisites.resolve; the trainer and the vlm-jax commands do)."
        )
    for where, value in _strings(plain, "config"):
        if value.startswith(PREFIX):
            raise ConfigError(
                f"{where} is the symbolic path {value!r}: resolve the config first "
                "(vlm_jax.prerequisites.resolve; the trainer and the vlm-jax commands do)."
            )


class _Resolver:
    """Resolves declared prerequisites on first reference, each once."""

    def __init__(self, declared: dict[str, Any], train: bool):
        self.declared, self.train = declared, train
        self.paths: dict[str, str] = {}
        self._resolving: list[str] = []

    def substitute(self, node: Any, where: str) -> Any:
        """`node` (dicts, lists, tuples, strings) with every `prerequisite:NAME[/rest]` made concrete."""
        if isinstance(node, dict):
            return {k: self.substitute(v, f"{where}.{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(self.substitute(v, f"{where}[{i}]") for i, v in enumerate(node))
        if isinstance(node, str) and node.startswith(PREFIX):
            name, sep, rest = node[len(PREFIX) :].partition("/")
            return self.path(name, where) + sep + rest
        return node

    def path(self, name: str, where: str) -> str:
        """The folder of prerequisite `name`, built or trained on the first call."""
        if name in self.paths:
            return self.paths[name]
        if name not in self.declared:
            known = ", ".join(sorted(self.declared)) or "none"
            raise ConfigError(
                f"{where} refers to the prerequisite {name!r}, which config.prerequisites does not declare "
                f"(declared: {known})."
            )
        if name in self._resolving:
            raise ConfigError(f"the prerequisites {' -> '.join(self._resolving + [name])} form a cycle.")
        spec = dict(self.declared[name])
        kind = spec.pop("kind", None)
        spec.pop("path", None)  # written by an earlier resolve: recomputed
        if kind not in KINDS:
            raise ConfigError(f"prerequisites.{name}.kind is {kind!r}, not one of {', '.join(KINDS)}.")
        unknown = sorted(set(spec) - set(KINDS[kind]))
        if unknown:
            raise ConfigError(
                f"prerequisites.{name}.{unknown[0]} is not a setting of a {kind} prerequisite "
                f"({', '.join(KINDS[kind])})."
            )
        self._resolving.append(name)
        try:
            if kind == "builtin_data":
                from data_pipelines.builtin import build

                path = _process_0_first(f"prerequisite {name}", lambda: build.ensure(**spec))
            elif kind == "real_images":
                from data_pipelines import real_images

                path = _process_0_first(f"prerequisite {name}", lambda: real_images.ensure(**spec))
            else:
                path = self._run(name, spec)
        finally:
            self._resolving.pop()
        self.paths[name] = path
        return path

    def _run(self, name: str, spec: dict[str, Any]) -> str:
        missing = [k for k in KINDS["run"] if k not in spec]
        if missing:
            raise ConfigError(f"the run prerequisite {name!r} has no {missing[0]}.")
        where = f"prerequisites.{name}"
        run = resolve(ConfigDict(self.substitute(spec["config"], f"{where}.config")), self.train)
        digest = hashlib.sha1(config_lib.to_json(run).encode()).hexdigest()[:10]
        path = f"{self.substitute(spec['workdir'], f'{where}.workdir')}-{digest}"
        if not self.train:
            return path
        from data_pipelines.builtin import build

        def train(workdir: str) -> None:
            from vlm_jax.train import trainer

            print(f"Training the prerequisite {name!r} ({run.total_steps} steps, once; kept in {path}).", flush=True)
            trainer.train(run, workdir)

        import jax

        if jax.process_count() == 1:
            return build.cached(path, "config.json", train)
        return _train_together(path, train)


def _process_0_first(what: str, make: Any) -> str:
    """`make()` on process 0, then on the others (which find its cached result): one build per multi-process
    run instead of one per process."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return make()
    if jax.process_index() == 0:
        path = make()
    multihost_utils.sync_global_devices(what)
    return path if jax.process_index() == 0 else make()


def _train_together(path: str, train: Any) -> str:
    """A prerequisite run of a multi-process run: every process trains (the run is collective) in one shared
    folder beside `path`, which process 0 renames into place when done; `path` is returned as is if complete."""
    import shutil

    import jax
    from jax.experimental import multihost_utils

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    building = os.path.join(os.path.dirname(path), f".building-{os.path.basename(path)}")
    if jax.process_index() == 0:
        shutil.rmtree(building, ignore_errors=True)  # a stopped earlier attempt's
        os.makedirs(building)
    multihost_utils.sync_global_devices(f"start {path}")
    train(building)
    multihost_utils.sync_global_devices(f"trained {path}")
    if jax.process_index() == 0:
        os.rename(building, path)
    multihost_utils.sync_global_devices(f"renamed {path}")
    return path


def fill_from_tokenizer(plain: dict[str, Any]) -> dict[str, Any]:
    """`plain` (a config as a dict) without its `from_tokenizer` list, whose keys it sets from `data.tokenizer`."""
    entries = plain.pop("from_tokenizer", None) or ()
    if not entries:
        return plain
    path = (plain.get("data") or {}).get("tokenizer")
    if not path:
        raise ConfigError("from_tokenizer sets keys from data.tokenizer, but the config has none.")
    from data_pipelines.tokenizer import Tokenizer

    tokenizer = Tokenizer(os.fspath(path))

    def value(what: Any, key: str) -> Any:
        if isinstance(what, (list, tuple)):
            return tuple(value(w, key) for w in what)
        if what in ("vocab_size", "eos_id"):
            return getattr(tokenizer, what)
        try:
            return tokenizer.token_id(what)
        except KeyError:
            raise ConfigError(
                f"from_tokenizer sets {key} to the id of {what!r}, a piece the tokenizer {path} does not have."
            ) from None

    for key, what in entries:
        plain = _replace(plain, key.split("."), value(what, key), key)
    return plain


def _replace(node: Any, parts: list[str], value: Any, key: str) -> Any:
    """`node` with the item at `parts` (dict keys, tuple / list indices) replaced by `value`."""
    if not parts:
        return value
    head, rest = parts[0], parts[1:]
    if isinstance(node, dict) and head in node:
        return {**node, head: _replace(node[head], rest, value, key)}
    if isinstance(node, (list, tuple)) and head.isdigit() and int(head) < len(node):
        items = list(node)
        items[int(head)] = _replace(items[int(head)], rest, value, key)
        return type(node)(items)
    raise ConfigError(f"from_tokenizer names {key}, which the config does not have.")


def _strings(node: Any, where: str):
    """(where, string) for every string in `node`."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{where}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _strings(v, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node
