"""LLaVA (Liu et al. 2023) and LLaVA-1.5: CLIP ViT patch features, projected, in place of `<image>` placeholders.

Variants (`--config configs/llava.py:variant=NAME[,stage=1|2][,data=DIR,tokenizer=FILE.model]`;
`configs/llava.py:data=builtin[,stage=S,scale=F]` trains the tiny model on the built-in dataset):
  tiny     a 2-layer CLIP-style ViT (patch 8), a 2-layer MLP projector, a 2-layer LM: CPU tests
  7b       LLaVA: CLIP ViT-L/14 at 224 px (256 features), one linear projector, a LLaMA-7B-shaped Vicuna
  1.5-7b   LLaVA-1.5: CLIP ViT-L/14 at 336 px (576 features), 2-layer GELU MLP, Vicuna-7B v1.5 (LLaMA-2-7B shapes)
  1.5-13b  the same with Vicuna-13B v1.5 (LLaMA-2-13B shapes)
  next-7b  LLaVA-NeXT (LLaVA-1.6, blog 2024-01-30) with Vicuna-7B: LLaVA-1.5-7B's parts plus AnyRes: each image
           is its 336 px base view and the tiles of the best grid pinpoint (up to 672 x 672, 336 x 1008, ...),
           the tiles' features laid out as one grid, the padding rows/columns cut off, and a learned
           `image_newline` feature after each grid row (data.image.anyres_layout="llava_next": the data names
           each placeholder's feature, data_pipelines/image_ops.anyres_feature_order)
  tiny-next  the tiny model with AnyRes on 32 px tiles (pinpoints 32x64, 64x32, 64x64)

Stages (LLaVA's recipe, arXiv:2304.08485 sec. 4 and arXiv:2310.03744 sec. 3):
  stage=1  feature alignment: only the projector trains (`connector/`), on caption pairs rendered with the
           "llava_plain" template (`<s><image>{caption}\\n`, the caption is the target)
  stage=2  instruction tuning: the projector and the LM train, on conversations rendered with the "llava"
           chat template (Vicuna v1), the loss on the answers only; the vision tower stays frozen.
           `stage1=DIR` starts every part from a stage-1 run (`model.stage_checkpoint`); on the built-in data
           (`data=builtin,stage=2`) the stage-1 run is a declared prerequisite, trained once when stage 2 starts.

The features are the ViT's penultimate layer (`feature_layer=-2`) without the class token
(`drop_class_token`), as transformers' `vision_feature_layer=-2`, `vision_feature_select_strategy="default"`.
`model.image_tokens` is derived from `model.image_size` and the patch size (one source:
`--config.model.image_size=448` changes the ViT, the data and the placeholder count together).
Vocabulary: llava-hf's checkpoints add `<image>` and `<pad>` to Vicuna's 32000 pieces (32064 rows with
padding to a multiple of 64); with `tokenizer=` the vocabulary and the `<image>` id are the tokenizer's,
read when the config is resolved (vlm_jax/prerequisites.py).
"""

from ml_collections import FieldReference

from vlm_jax.config_lib import ConfigDict, ConfigError, compute_dtype, module_defaults, parse_arg, training_config
from vlm_jax.encoders.vit import ViT
from vlm_jax.lm.decoder import DecoderLM

# LM shapes: width, layers, heads, MLP width. LLaMA-7B (Touvron et al. 2023, table 2) and LLaMA-2-7B / -13B
# (Touvron et al. 2023b) share these; Vicuna is a fine-tune of them.
LMS = {"7b": (4096, 32, 32, 11008), "13b": (5120, 40, 40, 13824)}
#                 image size, connector, LM
VARIANTS = {
    "7b": (224, "linear", "7b"),
    "1.5-7b": (336, "mlp", "7b"),
    "1.5-13b": (336, "mlp", "13b"),
    "next-7b": (336, "mlp", "7b"),
}
# LLaVA-NeXT's grid pinpoints (height, width) in tiles of 336 px (llava-v1.6 config.json `image_grid_pinpoints`).
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
TINY_PINPOINTS = ((32, 64), (64, 32), (64, 64))
VISION_FROZEN = ("vision/.*",)
LM_FROZEN = ("decoder/.*",)


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny", stage=2, data="", tokenizer="", scale=1.0, stage1="")
    if arg.variant not in ("tiny", "tiny-next") and arg.variant not in VARIANTS:
        raise ConfigError(f"variant {arg.variant!r} is not one of tiny, tiny-next, {', '.join(VARIANTS)}.")
    if arg.stage not in (1, 2):
        raise ConfigError(f"stage={arg.stage} is not 1 (projector only) or 2 (projector and LM).")
    if arg.data == "builtin":
        if arg.variant not in ("tiny", "tiny-next"):
            raise ConfigError(
                "data=builtin trains tiny or tiny-next; paper-size variants need data=DIR,tokenizer=FILE."
            )
        return builtin(arg)
    tiny = arg.variant.startswith("tiny")
    anyres = "next" in arg.variant
    c = training_config(
        total_steps=60 if tiny else 5000,
        batch_size=8 if tiny else 256,
        mesh="data=-1,fsdp=1,tensor=1" if tiny else "data=-1,fsdp=8,tensor=1",
    )

    vit = module_defaults(ViT)
    lm = dict(module_defaults(DecoderLM, exclude=("cross_attn_every",)), head_dim=0)  # 0 = embed_dim // heads
    if tiny:
        image_size, patch, seq_len, connector = FieldReference(32), 8, FieldReference(64), "mlp"
        vit.update(variant="", width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=patch)
        lm.update(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
    else:
        size, connector, lm_name = VARIANTS[arg.variant]
        image_size, patch, seq_len = FieldReference(size), 14, FieldReference(2048)
        vit.update(variant="L/14")
        width, layers, heads, mlp = LMS[lm_name]
        lm.update(
            vocab_size=32064, embed_dim=width, num_layers=layers, num_heads=heads, num_kv_heads=heads, mlp_dim=mlp,
            norm_eps=1e-5,
        )  # fmt: skip
    # CLIP's vision tower: pre-LayerNorm, quick GELU, LayerNorm eps 1e-5, a class token.
    vit.update(image_size=image_size, pre_norm=True, norm_eps=1e-5, mlp_act="quick_gelu", pool="cls")
    compute_dtype(vit, lm, tiny=tiny)
    c.model = ConfigDict(
        dict(
            name="llava",
            encoder="vit",
            encoder_kwargs=vit,
            feature_layer=-2,
            drop_class_token=True,
            connector=dict(kind=connector, **({"depth": 2} if connector == "mlp" else {})),
            lm=lm,
            image_size=image_size,
            image_tokens=(image_size // patch) * (image_size // patch),
            image_token_id=3,  # the tokenizer's "<image>" once resolved; 3 for configs without one (tests)
            image_newline=anyres,  # LLaVA-NeXT's learned feature after each grid row
            lm_checkpoint="",  # an `lm` checkpoint (e.g. convert-hf of Vicuna) for the LM
            vision_checkpoint="",  # a `vision_encoder` or `dual_encoder` checkpoint (e.g. convert-hf of CLIP)
            stage_checkpoint=arg.stage1,  # an earlier stage of this model (stage 2 starts from stage 1)
        )
    )
    c.data = ConfigDict(
        dict(
            name="grain",
            source="array_record",
            train_path=arg.data,
            validation_path=arg.data,
            tokenizer=arg.tokenizer,
            template="llava_plain" if arg.stage == 1 else "llava",
            seq_len=seq_len,
            max_images=5 if anyres else 1,  # image slots per row: AnyRes takes a base view and up to 4 tiles
            packing_bins=32,
            streams=0,  # data streams the records are dealt to; 0 = one per process (docs/data.md)
            shuffle=True,
            worker_count=0,
            interleaved=dict(max_tokens=seq_len, max_images=1),
            image=dict(mode="fixed", size=image_size, method="bicubic", normalization="clip", max_aspect_ratio=20.0),
        )
    )
    if anyres:
        c.data.image.update(
            mode="anyres", grid_pinpoints=TINY_PINPOINTS if tiny else NEXT_PINPOINTS, anyres_layout="llava_next"
        )
    if arg.tokenizer:
        c.from_tokenizer = (("model.lm.vocab_size", "vocab_size"), ("model.image_token_id", "<image>"))
    c.optim = ConfigDict(
        dict(
            name="adamw",
            # LLaVA-1.5: 1e-3 for stage 1, 2e-5 for stage 2, cosine with 3% warmup, no weight decay
            lr=(1e-3 if arg.stage == 1 else 2e-5) if not tiny else 3e-3,
            schedule="cosine",
            warmup_steps=5 if tiny else 150,
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            wd_exclude=(),
            clip_norm=1.0,
            freeze=VISION_FROZEN + (LM_FROZEN if arg.stage == 1 else ()),
            lr_mults=(),
        )
    )
    return c


def builtin(arg):
    """The tiny LLaVA on the built-in dataset (`data_pipelines/builtin`, declared as a prerequisite and built
    when training starts): stage 1 on its captions, stage 2 on captions + VQA + grounding conversations, with
    the VQA and caption evaluations on held-out combinations. The vision tower trains too (nothing pretrained
    exists offline), at the built-in scenes' 64 px: one 64 px view (64 features), or with `variant=tiny-next`
    LLaVA-NeXT's AnyRes on 32 px tiles (a base view and a 2 x 2 grid: 16 + 64 features and 8 newlines)."""
    from data_pipelines.builtin import build

    root = "prerequisite:builtin"
    variant = arg.variant
    c = get_config(f"variant={variant},stage={arg.stage},tokenizer={root}/{build.TOKENIZER}.model,data={root}")
    c.prerequisites = {"builtin": dict(kind="builtin_data", seed=0, image_size=64, scale=float(arg.scale))}
    steps = max(4, round(300 * float(arg.scale)))  # a scaled-down dataset (tests) trains a scaled-down run
    c.total_steps, c.batch_size, c.log_every = steps, 16, 50
    c.checkpoint_every, c.eval_every, c.eval_examples = steps, steps, 100
    c.model.image_size = 32 if variant == "tiny-next" else 64  # the tile size; 64 px: 64 image tokens
    c.data.seq_len = 192
    # Vicuna's long system message (~110 tokens with the built-in 512-piece vocabulary) would leave little room.
    c.data.template_options = {"system": "A chat between a user and an assistant."} if arg.stage == 2 else {}
    c.data.image.method = "bilinear"
    tasks = {"captions": 1.0} if arg.stage == 1 else {"captions": 1.0, "vqa": 2.0, "grounding": 0.5}
    c.data.mixture, c.eval_tasks, c.eval_baselines = build.chat_tasks(root, tasks)
    c.optim.update(lr=2e-3, warmup_steps=20, freeze=() if arg.stage == 2 else LM_FROZEN)
    if arg.stage == 2:  # starts from the stage-1 run on the same data, trained once when stage 2 starts
        stage1 = builtin(parse_arg(f"variant={variant},stage=1,scale={arg.scale}", variant="", stage=2, scale=1.0))
        del stage1["prerequisites"]  # it refers to this config's `builtin`
        stage1.eval_every, stage1.eval_tasks, stage1.eval_baselines = 0, {}, {}  # stage 2 is the one evaluated
        c.prerequisites.stage1 = dict(kind="run", workdir=f"{root}/llava-stage1", config=stage1)
        c.model.stage_checkpoint = "prerequisite:stage1"
    return c
