"""SigLIP: a ViT image tower with a MAP head and a text transformer, trained with the sigmoid loss.

The loss starts at t = exp(log 10), b = -10 (Zhai et al. 2023) and, with
`model.chunked_loss`, runs as a ring over the data-parallel devices so the
global B x B logits never exist.

Variants (`--config configs/siglip.py:variant=NAME`):
  tiny       a few hundred thousand params on the procedural shapes dataset
  B/16       SigLIP B/16 at 224: text 12 x 768, embed 768
  So400m/14  SigLIP So400m/14 at 384: text 27 x 1152 (MLP 4304), embed 1152

`configs/siglip.py:data=builtin` trains the tiny SigLIP on the built-in dataset's captions instead (64 px,
the dataset's own tokenizer; a prerequisite the trainer builds when training starts, once, cached:
vlm_jax/prerequisites.py) and evaluates it at the end on held-out
(colour, shape) combinations, scikit-learn's digits and scikit-image's photos (`builtin_job`).
"""

import math

from ml_collections import FieldReference

from data_pipelines import shapes
from vlm_jax import sharding
from vlm_jax.config_lib import ConfigDict, ConfigError, compute_dtype, module_defaults, parse_arg
from vlm_jax.encoders.text import TextTransformer
from vlm_jax.encoders.vit import ViT

# (vision variant, image size, text width, text depth, text heads, text mlp)
PAPER = {"B/16": ("B/16", 224, 768, 12, 12, 3072), "So400m/14": ("So400m/14", 384, 1152, 27, 16, 4304)}


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
        text = dict(vocab_size=384, width=48, depth=2, num_heads=3, mlp_dim=96, max_len=16)
    elif arg.variant in PAPER:
        variant, size, width, depth, heads, mlp = PAPER[arg.variant]
        c.total_steps, c.batch_size = 100_000, 32_768
        vision = dict(variant=variant, image_size=size)
        text = dict(vocab_size=32000, width=width, depth=depth, num_heads=heads, mlp_dim=mlp, max_len=64)
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
            loss="sigmoid",
            chunked_loss=True,
            projection="siglip",
            embed_dim=text["width"],
            logit_scale_init=math.log(10.0),
            logit_bias_init=-10.0,
            vision=dict(vision, pool="map", pre_norm=False, mlp_act="gelu_tanh", norm_eps=1e-6, posemb="learn"),
            text=dict(text, causal=False, pool="last", head=text["width"], mlp_act="gelu_tanh", norm_eps=1e-6),
        )
    )
    c.data = ConfigDict(
        shapes.pairs_data_config(c.model.vision.get_ref("image_size"), c.model.text.get_ref("max_len"), "siglip")
    )
    c.optim = ConfigDict(
        dict(
            name="adamw",
            lr=2e-3 if arg.variant == "tiny" else 1e-3,
            schedule="cosine",
            warmup_steps=20,
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=1e-4,
            wd_exclude=(),
            clip_norm=1.0,
            agc_clip=0.0,
            freeze=(),
            lr_mults=(),
        )
    )
    return builtin_job(c) if arg.data == "builtin" else c


def builtin_job(c):
    """The tiny SigLIP on the built-in captions (`data_pipelines/builtin`), evaluated at the end by
    `evaluators/dual_encoder_tasks.py`: retrieval and 40-class zero-shot on validation scenes of held-out
    (colour, shape) combinations, k-shot handwritten digits, scikit-image photos (docs/evaluation.md)."""
    from data_pipelines.pairs import builtin_captions_config
    from vlm_jax.evaluators.dual_encoder_tasks import builtin_eval_tasks

    root = "prerequisite:builtin"  # the built-in dataset's folder, once resolved
    c.prerequisites = ConfigDict(dict(builtin=dict(kind="builtin_data", seed=0, image_size=64, scale=1.0)))
    size, text_len = c.model.vision.get_ref("image_size"), c.model.text.get_ref("max_len")
    c.data = ConfigDict(builtin_captions_config(root, size, text_len, "siglip"))
    c.model.vision.image_size = 64  # the scenes' size
    c.model.text.max_len = 56  # the longest caption is 51 ids + bos + eos
    c.model.text.vocab_size = 0  # the tokenizer's, when the config is resolved
    c.from_tokenizer = (("model.text.vocab_size", "vocab_size"),)
    del c.zero_shot  # the shapes' colour labels; eval_tasks replaces it
    c.eval_tasks = builtin_eval_tasks(root)
    c.eval_examples = 256
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 1000, 50, 1000, 500
    return c
