"""Compile time of the NFNet forward pass against depth (issue 16: compile time flat in depth).

    python benchmarks/compile_time.py [--variants F0,F6] [--module /tmp/nfnet_old.py] [--repeats 1] [--grad]
        [--resolution 0]

Method. For each variant, `NFNet(variant=V, num_classes=1000)` (configs/nfnet.py's model) on one image at
the variant's train resolution (configs/nfnet.py's `RESOLUTION`; `--resolution R` uses R for all, to
separate depth from image size): parameters as abstract shapes
(`jax.eval_shape(model.init, ...)`, nothing allocated), then `jax.jit(model.apply).lower(params, images)`
(trace_s: tracing + lowering to StableHLO) and `.compile()` (compile_s: XLA) on the default backend;
`--grad` compiles the gradient of the summed logits with respect to the parameters instead.
`--module` takes `NFNet` from another copy of `vlm_jax/encoders/nfnet.py` instead, e.g. an earlier version
(`git show REV:vlm_jax/encoders/nfnet.py > /tmp/nfnet_old.py`), for a before/after comparison in one
environment. With `--repeats N` each time is the minimum of N fresh traces/compiles (jit caches are cleared
between them). The last line is JSON: {variant: {"blocks", "resolution", "trace_s", "compile_s", "total_s"}, "backend"}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from configs.nfnet import RESOLUTION  # noqa: E402


def load_nfnet(module: str | None):
    """`NFNet` from `vlm_jax.encoders.nfnet`, or from the file `module` (another version of it)."""
    if not module:
        from vlm_jax.encoders.nfnet import NFNet

        return NFNet
    spec = importlib.util.spec_from_file_location("_nfnet_under_test", module)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclass fields (Flax modules) resolve their module by name
    spec.loader.exec_module(mod)
    return mod.NFNet


def measure(nfnet_cls, variant: str, repeats: int = 1, grad: bool = False, resolution: int = 0) -> dict:
    model = nfnet_cls(variant=variant, num_classes=1000)
    fn = model.apply
    if grad:  # the gradient of the summed logits with respect to the parameters (a training step's backward)
        fn = jax.grad(lambda p, x: jnp.sum(model.apply(p, x)["logits"]))
    res = resolution or RESOLUTION[variant]
    images = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), images))
    trace_s, compile_s = [], []
    for _ in range(repeats):
        jax.clear_caches()
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(params, images)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        trace_s.append(t1 - t0)
        compile_s.append(t2 - t1)
    blocks = sum(model.config()["depths"])
    return dict(
        blocks=blocks,
        resolution=res,
        trace_s=round(min(trace_s), 2),
        compile_s=round(min(compile_s), 2),
        total_s=round(min(a + b for a, b in zip(trace_s, compile_s)), 2),
    )


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="F0,F6", help="comma-separated NFNet variants (F0..F7)")
    parser.add_argument("--module", default="", help="path of another nfnet.py to take NFNet from")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=0, help="image size for every variant (0: each its own)")
    parser.add_argument("--grad", action="store_true", help="compile the parameter gradient instead of the forward")
    args = parser.parse_args(argv)
    nfnet_cls = load_nfnet(args.module)
    out: dict = {}
    for variant in args.variants.split(","):
        out[variant] = measure(nfnet_cls, variant, args.repeats, args.grad, args.resolution)
        print(variant, out[variant], flush=True)
    out["backend"] = jax.default_backend()
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
