"""Idefics3 (Laurençon et al. 2024, arXiv:2408.12637, "Building and better understanding vision-language models"):
SigLIP tiles -> pixel shuffle + one bias-free linear -> Llama 3.

Variants (`--config configs/idefics3.py:variant=NAME[,data=DIR,tokenizer=FILE.model]`;
`configs/idefics3.py:data=builtin[,scale=F]` trains the tiny model on the built-in dataset):
  tiny  a 2-layer SigLIP-style ViT (32 px tiles, patch 4: 64 patches -> 16 tokens), the connector, a 2-layer LM;
        images split as Idefics3 splits them, with at most 2 tiles a side (`data.image.longest_edge` 64): CPU tests
  8b    HuggingFaceM4/Idefics3-8B-Llama3 (8.46B): SigLIP so400m/14 at 364 px (27 layers, width 1152, MLP 4304,
        16 heads: 26 x 26 patches), pixel shuffle by 2 (169 tokens per tile), a 4608 -> 4096 linear, Llama 3.1 8B
        Instruct (the model card's parent LM; its "llama3" RoPE scaling; 128,259 entries: Llama 3's 128,256 and
        `<fake_token_around_image>`, `<image>`, `<end_of_utterance>`).
        Shapes: transformers' Idefics3 config defaults and the checkpoint's config.json as transformers'
        documentation and the hub's safetensors count (8.46B) give them.

Every image is split as transformers' `Idefics3ImageProcessor` does (`data.image.mode="idefics3"`,
`image_ops.idefics3_tiles`): the longest side resized to `longest_edge` (4 x 364 = 1456), both sides rounded up
to multiples of 364, cut into rows x cols tiles of 364 px, then the global image at 364 px; each tile is one media
slot (`data.max_images` 17 = a 4 x 4 grid and the global image), 169 `<image>` placeholders per tile inside the
"idefics3" template's `<fake_token_around_image><row_r_col_c>` ... `<global-img>` layout. The template needs each
image's grid: the pipeline passes it; prompts built from placeholder counts alone (`vlm-jax generate`, the
generative evaluations) infer it from `template_options.tile_tokens` and `tiles_per_side`, which is certain only
for unsplit images and square grids (others are refused as "ambiguous_grid").

Not modelled: Idefics3's training stages and recipe (the released checkpoint is the reference; the optimizer
settings here are generic AdamW values, marked as such), and padded tiles (`pixel_attention_mask` with zeros:
every tile here is a full 364 px square, as the processor makes them when it splits).
"""

from ml_collections import FieldReference

from vlm_jax.config_lib import ConfigDict, ConfigError, compute_dtype, module_defaults, parse_arg, training_config
from vlm_jax.encoders.vit import ViT
from vlm_jax.lm.decoder import DecoderLM

# HuggingFaceM4/Idefics3-8B-Llama3: SigLIP so400m/14 at 364 px; width, depth, MLP width, heads.
VIT_8B = (1152, 27, 4304, 16)
# Llama 3.1 8B with Idefics3's three added tokens: width, layers, heads, kv heads, MLP width, vocabulary, RoPE theta.
LM_8B = (4096, 32, 32, 8, 14336, 128259, 500000.0)
# Llama 3.1's RoPE scaling (meta-llama/Meta-Llama-3.1-8B-Instruct config.json, the card's parent LM).
LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)  # fmt: skip
PATCH, TILE, TILES_PER_SIDE, SCALE = 14, 364, 4, 2


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny", data="", tokenizer="", scale=1.0)
    if arg.variant not in ("tiny", "8b"):
        raise ConfigError(f"variant {arg.variant!r} is not one of tiny, 8b.")
    if arg.data == "builtin":
        if arg.variant != "tiny":
            raise ConfigError("data=builtin trains the tiny model; the 8b variant needs data=DIR,tokenizer=FILE.")
        return builtin(arg)
    tiny = arg.variant == "tiny"
    c = training_config(
        total_steps=60 if tiny else 5000,
        batch_size=8 if tiny else 256,
        mesh="data=-1,fsdp=1,tensor=1" if tiny else "data=-1,fsdp=8,tensor=1",
    )
    vit = module_defaults(ViT)
    lm = dict(module_defaults(DecoderLM, exclude=("cross_attn_every",)), head_dim=0)  # 0 = embed_dim // heads
    if tiny:
        image_size, patch, tiles_per_side, seq_len = FieldReference(32), 4, FieldReference(2), FieldReference(256)
        width, depth, mlp_dim, heads = 32, 2, 64, 2
        lm.update(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
    else:
        image_size, patch, seq_len = FieldReference(TILE), PATCH, FieldReference(8192)
        tiles_per_side = FieldReference(TILES_PER_SIDE)
        width, depth, mlp_dim, heads = VIT_8B
        embed, layers, lm_heads, kv, lm_mlp, vocab, theta = LM_8B
        lm.update(
            vocab_size=vocab, embed_dim=embed, num_layers=layers, num_heads=lm_heads, num_kv_heads=kv, mlp_dim=lm_mlp,
            rope_theta=theta, norm_eps=1e-5, tie_embeddings=False, rope_scaling=dict(LLAMA31_ROPE),
        )  # fmt: skip
    # Idefics3's SigLIP tower: learned positions, no class token, LayerNorm eps 1e-6, tanh GELU, the
    # post-LayerNormed tokens (last_hidden_state), no pooling head.
    vit.update(
        variant="", width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=patch,
        image_size=image_size, pool="none", class_token=False, pre_norm=False, final_norm=True, norm_tokens=True,
        norm_eps=1e-6, mlp_act="gelu_tanh", posemb="learn", patch_bias=True, attn_bias=True,
    )  # fmt: skip
    compute_dtype(vit, lm, tiny=tiny)
    image_tokens = (image_size // patch // SCALE) * (image_size // patch // SCALE)  # per tile, after the shuffle
    c.model = ConfigDict(
        dict(
            name="idefics3",
            encoder="vit",
            encoder_kwargs=vit,
            feature_layer=None,  # the post-LayerNormed final tokens
            drop_class_token=False,
            connector=dict(kind="pixel_shuffle_linear", factor=SCALE),
            lm=lm,
            image_size=image_size,
            image_tokens=image_tokens,
            image_token_id=3 if tiny else 128257,  # the tokenizer's "<image>" once resolved
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
            template="idefics3",
            template_options={"tile_tokens": image_tokens, "tiles_per_side": tiles_per_side},
            seq_len=seq_len,
            max_images=tiles_per_side * tiles_per_side + 1,  # the largest grid and the global image
            packing_bins=32,
            streams=0,  # data streams the records are dealt to; 0 = one per process (docs/data.md)
            shuffle=True,
            worker_count=0,
            interleaved=dict(max_tokens=seq_len, max_images=1),
            image=dict(
                mode="idefics3",
                size=image_size,
                longest_edge=image_size * tiles_per_side,  # follows template_options.tiles_per_side
                normalization="siglip",  # Idefics3's IMAGENET_STANDARD mean and std: 0.5, 0.5
                max_aspect_ratio=20.0,
            ),
        )
    )
    if arg.tokenizer:
        c.from_tokenizer = (("model.lm.vocab_size", "vocab_size"), ("model.image_token_id", "<image>"))
    c.optim = ConfigDict(
        dict(
            name="adamw",
            lr=3e-3 if tiny else 1e-5,  # assumption: generic fine-tuning values (the paper states no recipe here)
            schedule="cosine",
            warmup_steps=5 if tiny else 150,
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            wd_exclude=(),
            clip_norm=1.0,
            freeze=(),
            lr_mults=(),
        )
    )
    return c


def builtin(arg):
    """The tiny Idefics3 on the built-in dataset (a declared prerequisite, built when training starts): captions,
    VQA and grounding conversations in Idefics3 chat, every 64 px image split as Idefics3 splits it (32 px tiles:
    2 x 2 tiles and the global image, 5 media slots of 16 tokens; rows of 384 tokens and 10 slots), nothing
    frozen (nothing pretrained exists offline), VQA and caption evaluations on held-out combinations."""
    from data_pipelines.builtin import build

    root = "prerequisite:builtin"
    c = get_config(f"variant=tiny,tokenizer={root}/{build.TOKENIZER}.model,data={root}")
    c.prerequisites = {"builtin": dict(kind="builtin_data", seed=0, image_size=64, scale=float(arg.scale))}
    steps = max(4, round(300 * float(arg.scale)))
    c.total_steps, c.batch_size, c.log_every = steps, 16, 50
    c.checkpoint_every, c.eval_every, c.eval_examples = steps, steps, 100
    c.data.seq_len, c.data.max_images = 384, 10  # room for two examples' tiles per packed row
    c.data.mixture, c.eval_tasks, c.eval_baselines = build.chat_tasks(root)
    c.optim.update(lr=2e-3, warmup_steps=20)
    return c
