"""InternVL 1.5 (Chen et al. 2024, arXiv:2404.16821), Mini-InternVL-Chat-4B-V1-5 and the InternVL2 sizes: InternViT
tiles -> pixel shuffle + MLP -> an InternLM2 / Phi-3 / Qwen2 LM.

Variants (`--config configs/internvl.py:variant=NAME[,stage=1|2][,data=DIR,tokenizer=FILE.model]`;
`configs/internvl.py:data=builtin[,scale=F]` trains the tiny model on the built-in dataset):
  tiny     a 2-layer InternViT-6B-style ViT (QK-RMSNorm, RMSNorm, layer scale; 32 px tiles, patch 4: 64 patches
           -> 16 tokens), the pixel-shuffle MLP, a 2-layer LM: CPU tests
  1.5      InternVL-Chat-V1-5 (25.5B): InternViT-6B-448px-V1-5 (45 of InternViT-6B's 48 layers: the features
           are the original's 4th-from-last layer) + MLP + InternLM2-Chat-20B; "internlm2" chat style
  mini-4b  Mini-InternVL-Chat-4B-V1-5 (4.2B): InternViT-300M-448px (LayerNorm, q/k/v biases, no QK norm) + MLP
           + Phi-3-mini-128k-instruct; "phi3" chat style
  2-1b, 2-2b, 2-4b, 2-8b, 2-26b   InternVL2 (blog 2024-07): InternViT-300M-448px with Qwen2-0.5B-Instruct,
           InternLM2-Chat-1.8B, Phi-3-mini-128k-instruct, InternLM2.5-7B-Chat; 2-26b is InternVL 1.5's parts

Every variant tiles images as InternVL 1.5 trains: `data.image.mode="internvl"`, 1 to `max_tiles=12` tiles of
448 px on the closest aspect-ratio grid plus a thumbnail, each tile one media slot (`data.max_images` = 13),
256 `<IMG_CONTEXT>` placeholders per tile. At test time InternVL takes up to 40 tiles:
`--config.data.image.max_tiles=40 --config.data.max_images=41` (eval), which changes no parameter.

Stages (arXiv:2404.16821 sec. 4; the Mini-InternVL card): stage=1 pretraining trains the ViT and the MLP with
the LM frozen (Mini-InternVL and the InternVL2 variants: the MLP only, `optim.freeze` adds `vision/`),
stage=2 fine-tunes everything.
Context 4096 tokens (Mini-InternVL: 8192). The paper leaves learning rates and batch sizes unstated; the
values here are InternVL's released fine-tuning scripts' (lr 4e-5 / 2e-4 stage 1, cosine, 3% warmup,
weight decay 0.05 / 0.01) and are marked as such.

Not modelled: InternLM2-Chat-20B's dynamic NTK RoPE scaling and Phi-3-mini-128k's LongRoPE (the LMs here use
plain RoPE at their base theta: parameter counts are unaffected; positions beyond the 4K training context are).
"""

from ml_collections import FieldReference

from vlm_jax.config_lib import ConfigDict, ConfigError, compute_dtype, module_defaults, parse_arg, training_config
from vlm_jax.encoders.vit import ViT
from vlm_jax.lm.decoder import DecoderLM

# InternViT shapes (OpenGVLab InternViT-6B-448px-V1-5 and InternViT-300M-448px config.json): width, depth, MLP
# width, heads, norm, q/k/v bias, QK-norm.
VITS = {
    "6b": (3200, 45, 12800, 25, "rmsnorm", False, True),
    "300m": (1024, 24, 4096, 16, "layernorm", True, False),
}
# LMs (their config.json; vocabularies as the InternVL chat checkpoints' llm_config): width, layers, heads,
# kv heads, MLP width, vocabulary, RoPE theta, RMSNorm eps, q/k/v biases, tied head.
LMS = {
    "internlm2-20b": (6144, 48, 48, 8, 16384, 92553, 1e6, 1e-5, False, False),
    "internlm2-1.8b": (2048, 24, 16, 8, 8192, 92553, 1e6, 1e-5, False, False),
    "internlm2.5-7b": (4096, 32, 32, 8, 14336, 92553, 1e6, 1e-5, False, False),
    "phi3-mini": (3072, 32, 32, 32, 8192, 32064, 1e4, 1e-5, False, False),
    "qwen2-0.5b": (896, 24, 14, 2, 4864, 151655, 1e6, 1e-6, True, False),
}
#              ViT, LM, chat style, context
VARIANTS = {
    "1.5": ("6b", "internlm2-20b", "internlm2", 4096),
    "mini-4b": ("300m", "phi3-mini", "phi3", 8192),
    "2-1b": ("300m", "qwen2-0.5b", "internlm2", 8192),
    "2-2b": ("300m", "internlm2-1.8b", "internlm2", 8192),
    "2-4b": ("300m", "phi3-mini", "phi3", 8192),
    "2-8b": ("300m", "internlm2.5-7b", "internlm2", 8192),
    "2-26b": ("6b", "internlm2-20b", "internlm2", 8192),
}
PATCH, TILE = 14, 448
VISION, LM = ("vision/.*",), ("decoder/.*",)


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny", stage=2, data="", tokenizer="", scale=1.0)
    if arg.variant != "tiny" and arg.variant not in VARIANTS:
        raise ConfigError(f"variant {arg.variant!r} is not one of tiny, {', '.join(VARIANTS)}.")
    if arg.stage not in (1, 2):
        raise ConfigError(f"stage={arg.stage} is not 1 (pretraining: LM frozen) or 2 (fine-tuning: all).")
    if arg.data == "builtin":
        if arg.variant != "tiny":
            raise ConfigError("data=builtin trains the tiny model; paper-size variants need data=DIR,tokenizer=FILE.")
        return builtin(arg)
    tiny = arg.variant == "tiny"
    c = training_config(
        total_steps=60 if tiny else 5000,
        batch_size=8 if tiny else 1024,
        mesh="data=-1,fsdp=1,tensor=1" if tiny else "data=-1,fsdp=8,tensor=1",
    )

    vit = module_defaults(ViT)
    lm = dict(module_defaults(DecoderLM, exclude=("cross_attn_every",)), head_dim=0)  # 0 = embed_dim // heads
    if tiny:
        image_size, patch, seq_len, style, max_tiles = FieldReference(32), 4, FieldReference(128), "internlm2", 4
        vit_shape = (32, 2, 64, 2, "rmsnorm", False, True)
        lm.update(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
    else:
        vit_name, lm_name, style, context = VARIANTS[arg.variant]
        image_size, patch, seq_len, max_tiles = FieldReference(TILE), PATCH, FieldReference(context), 12
        vit_shape = VITS[vit_name]
        width, layers, heads, kv, mlp, vocab, theta, eps, qkv_bias, tied = LMS[lm_name]
        lm.update(
            vocab_size=vocab, embed_dim=width, num_layers=layers, num_heads=heads, num_kv_heads=kv, mlp_dim=mlp,
            rope_theta=theta, norm_eps=eps, qkv_bias=qkv_bias, tie_embeddings=tied,
        )  # fmt: skip
    width, depth, mlp_dim, heads, norm, qkv_bias, qk_norm = vit_shape
    vit.update(
        variant="", width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=patch,
        image_size=image_size, norm=norm, norm_eps=1e-6, mlp_act="gelu", attn_bias=qkv_bias, attn_out_bias=True,
        qk_norm=qk_norm, qk_norm_over="all", layer_scale=0.1, pool="none", class_token=True, final_norm=False,
        posemb_resample="bicubic",
    )  # fmt: skip
    compute_dtype(vit, lm, tiny=tiny)
    c.model = ConfigDict(
        dict(
            name="internvl",
            encoder="vit",
            encoder_kwargs=vit,
            feature_layer=None,  # the last block's output (no final norm): InternVL's select_layer=-1
            drop_class_token=True,
            connector=dict(kind="pixel_shuffle_mlp", factor=2, version="v2"),
            lm=lm,
            image_size=image_size,
            image_tokens=(image_size // patch // 2) * (image_size // patch // 2),  # per tile, after the shuffle
            image_token_id=3,  # the tokenizer's "<IMG_CONTEXT>" once resolved; 3 without one (tests)
            lm_checkpoint="",
            vision_checkpoint="",
            stage_checkpoint="",
        )
    )
    c.data = ConfigDict(
        dict(
            name="grain",
            source="array_record",
            train_path=arg.data,
            validation_path=arg.data,
            tokenizer=arg.tokenizer,
            template="internvl",
            template_options={"style": style},
            seq_len=seq_len,
            max_images=max_tiles + 1,  # the tiles and the thumbnail of one image
            packing_bins=32,
            streams=0,  # data streams the records are dealt to; 0 = one per process (docs/data.md)
            shuffle=True,
            worker_count=0,
            interleaved=dict(max_tokens=seq_len, max_images=1),
            image=dict(
                mode="internvl",
                size=image_size,
                min_tiles=1,
                max_tiles=max_tiles,
                use_thumbnail=True,
                normalization="imagenet",
                max_aspect_ratio=20.0,
            ),
        )
    )
    if arg.tokenizer:
        c.from_tokenizer = (("model.lm.vocab_size", "vocab_size"), ("model.image_token_id", "<IMG_CONTEXT>"))
    # Stage 1 trains the MLP (the connector) and, in InternVL 1.5 alone, the ViT; the LM stays frozen.
    stage1_freeze = LM + (VISION if arg.variant not in ("tiny", "1.5") else ())
    c.optim = ConfigDict(
        dict(
            name="adamw",
            lr=3e-3 if tiny else (2e-4 if arg.stage == 1 else 4e-5),  # InternVL's scripts (the paper is silent)
            schedule="cosine",
            warmup_steps=5 if tiny else 150,  # 3% of the run
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.05 if arg.stage == 2 else 0.01,
            wd_exclude=(),
            clip_norm=1.0,
            freeze=stage1_freeze if arg.stage == 1 else (),
            lr_mults=(),
        )
    )
    return c


def builtin(arg):
    """The tiny InternVL on the built-in dataset (a declared prerequisite, built when training starts): captions,
    VQA and grounding conversations in InternLM2 chat, every 64 px image tiled as InternVL tiles (32 px tiles:
    2 x 2 tiles and the thumbnail, 5 media slots of 16 tokens; rows of 352 tokens and 10 slots), nothing frozen (nothing pretrained exists
    offline), VQA and caption evaluations on held-out combinations."""
    from data_pipelines.builtin import build

    root = "prerequisite:builtin"
    c = get_config(f"variant=tiny,stage={arg.stage},tokenizer={root}/{build.TOKENIZER}.model,data={root}")
    c.prerequisites = {"builtin": dict(kind="builtin_data", seed=0, image_size=64, scale=float(arg.scale))}
    steps = max(4, round(300 * float(arg.scale)))
    c.total_steps, c.batch_size, c.log_every = steps, 16, 50
    c.checkpoint_every, c.eval_every, c.eval_examples = steps, steps, 100
    c.data.seq_len, c.data.max_images = 352, 10  # room for two examples' tiles per packed row
    # InternVL's Chinese system message (~60 pieces with the built-in 512-piece vocabulary) would leave little room.
    c.data.template_options = {"style": "internlm2", "system": "A chat between a user and an assistant."}
    c.data.mixture, c.eval_tasks, c.eval_baselines = build.chat_tasks(root)
    c.optim.update(lr=2e-3, warmup_steps=20, freeze=())
    return c
