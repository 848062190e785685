"""CLIP: a ViT image tower and a causal text transformer trained with the softmax contrastive loss.

Variants (`--config configs/clip.py:variant=NAME`):
  tiny   a few hundred thousand params on the procedural shapes dataset; trains in a minute on a CPU
  B/16   CLIP ViT-B/16 (Radford et al. 2021): image ViT-B/16 at 224, text 12 x 512, embed 512
  L/14   CLIP ViT-L/14: image ViT-L/14 at 224, text 12 x 768, embed 768

`configs/clip.py:data=builtin` trains the tiny CLIP on the built-in dataset's captions instead (64 px, the
dataset's own tokenizer; a prerequisite the trainer builds when training starts, once, cached:
vlm_jax/prerequisites.py) and evaluates it at the end on held-out (colour,
shape) combinations, scikit-learn's digits and scikit-image's photos (`builtin_job`).
"""

import math

from ml_collections import FieldReference

from data_pipelines import shapes
from vlm_jax import sharding
from vlm_jax.config_lib import ConfigDict, ConfigError, compute_dtype, module_defaults, parse_arg
from vlm_jax.encoders.text import TextTransformer
from vlm_jax.encoders.vit import ViT

# (vision variant, image size, text width, text depth, text heads, embed dim)
PAPER = {"B/16": ("B/16", 224, 512, 12, 8, 512), "L/14": ("L/14", 224, 768, 12, 12, 768)}


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny", data="")
    if arg.data not in ("", "builtin"):
        raise ConfigError(f"data={arg.data!r}: use data=builtin, or leave it out for the procedural shapes.")
    if arg.data and arg.variant != "tiny":
        raise ConfigError("data=builtin trains the tiny variant.")
    c = ConfigDict()
    c.seed = 0
    c.mesh = "data=-1,fsdp=1,tensor=1"
    c.logical_axis_rules = sharding.DEFAULT_RULES
    c.grad_accum_steps = 1
    c.log_every = 20
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.max_consecutive_nonfinite = 10  # skipped non-finite updates in a row that stop the run; 0 = never
    c.schedule_steps = 0  # the learning-rate schedule's length; 0 = total_steps
    c.eval_every = 100
    c.eval_steps = 2
    c.eval_examples = 256
    c.peak_tflops = 0.0
    if arg.variant == "tiny":
        c.total_steps, c.batch_size = 300, 64
        vision = dict(width=48, depth=2, num_heads=3, mlp_dim=96, patch_size=8, image_size=32)
        text = dict(vocab_size=384, width=48, depth=2, num_heads=3, mlp_dim=96, max_len=16, eos_token_id=3)
        embed_dim = 32
    elif arg.variant in PAPER:
        variant, size, width, depth, heads, embed_dim = PAPER[arg.variant]
        c.total_steps, c.batch_size = 100_000, 32_768
        vision = dict(variant=variant, image_size=size)
        text = dict(
            vocab_size=49408,
            width=width,
            depth=depth,
            num_heads=heads,
            mlp_dim=4 * width,
            max_len=77,
            eos_token_id=49407,
        )
    else:
        raise ConfigError(f"variant {arg.variant!r} is not one of tiny, {', '.join(PAPER)}.")
    # One source each: model.vision.image_size is data.image_size, model.text.max_len is data.text_len (one
    # reference each). Every ViT and text-tower setting is a key, at the module's default unless set here.
    vision = dict(module_defaults(ViT), **dict(vision, image_size=FieldReference(vision["image_size"])))
    text = dict(module_defaults(TextTransformer), **dict(text, max_len=FieldReference(text["max_len"])))
    compute_dtype(vision, text, tiny=arg.variant == "tiny")
    c.zero_shot = ConfigDict(shapes.zero_shot_config())
    c.model = ConfigDict(
        dict(
            name="dual_encoder",
            loss="softmax",
            projection="clip",
            embed_dim=embed_dim,
            logit_scale_init=math.log(1 / 0.07),
            logit_bias_init=None,
            vision=dict(vision, pool="cls", pre_norm=True, mlp_act="quick_gelu", norm_eps=1e-5, posemb="learn"),
            text=dict(text, causal=True, pool="eos", mlp_act="quick_gelu", norm_eps=1e-5),
        )
    )
    c.data = ConfigDict(
        shapes.pairs_data_config(c.model.vision.get_ref("image_size"), c.model.text.get_ref("max_len"), "clip")
    )
    c.optim = ConfigDict(
        dict(
            name="adamw",
            lr=2e-3 if arg.variant == "tiny" else 5e-4,
            schedule="cosine",
            warmup_steps=20,
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            weight_decay=0.1,
            wd_exclude=(),
            clip_norm=1.0,
            agc_clip=0.0,
            freeze=(),
            lr_mults=(),
        )
    )
    return builtin_job(c) if arg.data == "builtin" else c


def builtin_job(c):
    """The tiny CLIP on the built-in captions (`data_pipelines/builtin`), evaluated at the end by
    `evaluators/dual_encoder_tasks.py` as `configs/siglip.py:data=builtin` is (docs/evaluation.md)."""
    from data_pipelines.pairs import builtin_captions_config
    from vlm_jax.evaluators.dual_encoder_tasks import builtin_eval_tasks

    root = "prerequisite:builtin"  # the built-in dataset's folder, once resolved
    c.prerequisites = ConfigDict(dict(builtin=dict(kind="builtin_data", seed=0, image_size=64, scale=1.0)))
    size, text_len = c.model.vision.get_ref("image_size"), c.model.text.get_ref("max_len")
    c.data = ConfigDict(builtin_captions_config(root, size, text_len, "clip"))
    c.model.vision.image_size = 64  # the scenes' size
    c.model.text.max_len = 56  # the longest caption is 51 ids + bos + eos
    c.model.text.vocab_size = c.model.text.eos_token_id = 0  # the tokenizer's, when the config is resolved
    c.from_tokenizer = (("model.text.vocab_size", "vocab_size"), ("model.text.eos_token_id", "eos_id"))
    del c.zero_shot  # the shapes' colour labels; eval_tasks replaces it
    c.eval_tasks = builtin_eval_tasks(root)
    c.eval_examples = 256
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 1000, 50, 1000, 500
    return c
