"""Qwen2-VL (Wang et al. 2024, arXiv:2409.12191) and Qwen2.5-VL (Bai et al. 2025, arXiv:2502.13923): a
native-resolution ViT, a 2 x 2 patch merger and a Qwen2 / Qwen2.5 LM with M-RoPE.

Variants (`--config configs/qwen2_vl.py:variant=NAME[,data=DIR,tokenizer=FILE.model]`):
  tiny                  a 2-layer native-resolution ViT (width 32, patch 14), the merger, a 2-layer M-RoPE LM
  tiny-2.5              the same with Qwen2.5-VL's ViT (RMSNorm, gated SiLU MLP, window attention but layer 1)
  2b, 7b, 72b           Qwen2-VL: the 675M ViT (32 layers of width 1280, LayerNorm, quick-GELU MLP of 5120)
                        with Qwen2-1.5B / Qwen2-7B / Qwen2-72B shapes (config.json of Qwen/Qwen2-VL-*-Instruct)
  2.5-3b, 2.5-7b, 2.5-72b  Qwen2.5-VL: its ViT (32 layers of width 1280, RMSNorm, gated MLP of 3420, 112 px
                        windows, full attention in layers 7, 15, 23, 31) with Qwen2.5-3B / -7B / -72B shapes

M-RoPE sections (16, 24, 24) of the 64 frequency pairs of a 128-dim head: temporal, height, width. Images keep
their aspect ratio: sides rounded to multiples of 28 px, area within [`data.image.min_pixels`,
`max_pixels`] (transformers' defaults 56^2 and 28^2 x 1280: at most 1280 LM tokens per image); a row holds
at most `data.max_patches` patches (4 per LM token).

Data: `data.image.mode="native"` (`data_pipelines/native_resolution.py`): every image is its own number of
patches; the packer fills rows under two budgets at once, `data.seq_len` tokens and `data.max_patches`
patches, and writes each example's M-RoPE positions; the "qwen2_vl" chat template writes
`<|vision_start|>` + one `<|image_pad|>` per merged token + `<|vision_end|>` per image.
`configs/qwen2_vl.py:data=builtin[,variant=tiny-2.5,scale=F]` trains the tiny model on the built-in dataset.
"""

from ml_collections import FieldReference

from vlm_jax.config_lib import ConfigDict, ConfigError, compute_dtype, module_defaults, parse_arg, training_config
from vlm_jax.encoders.native_vit import NativeViT
from vlm_jax.lm.decoder import DecoderLM

SECTIONS = (16, 24, 24)
# LMs (config.json of the Qwen2-VL / Qwen2.5-VL checkpoints): width, layers, heads, kv heads, MLP width, vocabulary,
# tied head.
LMS = {
    "2b": (1536, 28, 12, 2, 8960, 151936, True),
    "7b": (3584, 28, 28, 4, 18944, 152064, False),
    "72b": (8192, 80, 64, 8, 29568, 152064, False),
    "2.5-3b": (2048, 36, 16, 2, 11008, 151936, True),
    "2.5-7b": (3584, 28, 28, 4, 18944, 152064, False),
    "2.5-72b": (8192, 80, 64, 8, 29568, 152064, False),
}
QWEN2_VIT = dict(width=1280, depth=32, mlp_dim=5120, num_heads=16, norm="layernorm", mlp="plain", mlp_act="quick_gelu")
QWEN25_VIT = dict(
    width=1280, depth=32, mlp_dim=3420, num_heads=16, norm="rmsnorm", mlp="gated", mlp_act="silu", window_merge=4,
    full_attention_layers=(7, 15, 23, 31),
)  # fmt: skip


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny", data="", tokenizer="", scale=1.0)
    tiny = arg.variant.startswith("tiny")
    if arg.variant not in ("tiny", "tiny-2.5") and arg.variant not in LMS:
        raise ConfigError(f"variant {arg.variant!r} is not one of tiny, tiny-2.5, {', '.join(LMS)}.")
    if arg.data == "builtin":
        if not tiny:
            raise ConfigError("data=builtin trains tiny or tiny-2.5; paper-size variants need data=DIR,tokenizer=FILE.")
        return builtin(arg)
    qwen25 = "2.5" in arg.variant
    c = training_config(
        total_steps=60 if tiny else 5000,
        batch_size=8 if tiny else 512,
        mesh="data=-1,fsdp=1,tensor=1" if tiny else "data=-1,fsdp=8,tensor=1",
    )
    vit = module_defaults(NativeViT)
    lm = dict(module_defaults(DecoderLM, exclude=("cross_attn_every",)), head_dim=0)
    if tiny:
        vit.update(width=32, depth=2, mlp_dim=64, num_heads=2)
        if qwen25:
            vit.update(norm="rmsnorm", mlp="gated", mlp_act="silu", window_merge=2, full_attention_layers=(1,))
        lm.update(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
        sections, seq_len, max_patches = (2, 3, 3), FieldReference(128), 256
    else:
        vit.update(QWEN25_VIT if qwen25 else QWEN2_VIT)
        width, layers, heads, kv, mlp, vocab, tied = LMS[arg.variant]
        lm.update(
            vocab_size=vocab, embed_dim=width, num_layers=layers, num_heads=heads, num_kv_heads=kv, mlp_dim=mlp,
            rope_theta=1e6, norm_eps=1e-6, qkv_bias=True, tie_embeddings=tied,
        )  # fmt: skip
        sections, seq_len, max_patches = SECTIONS, FieldReference(8192), 16384
    lm.update(mrope_sections=sections)
    compute_dtype(vit, lm, tiny=tiny)
    c.model = ConfigDict(
        dict(
            name="qwen2_vl",
            vision=vit,
            merger=dict(norm="rmsnorm" if qwen25 else "layernorm", norm_eps=1e-6),
            lm=lm,
            image_token_id=3,  # the tokenizer's "<|image_pad|>" once resolved; 3 without one (tests)
            # `vlm-jax forward` only: transformers' <|video_pad|> id (the data writes <|image_pad|> for videos too);
            # -1 = none. Qwen2.5-VL steps a video's temporal positions by seconds x tokens_per_second (2).
            video_token_id=-1,
            video_tokens_per_second=2.0 if qwen25 else 0.0,
        )
    )
    c.data = ConfigDict(
        dict(
            name="grain",
            source="array_record",
            train_path=arg.data,
            validation_path=arg.data,
            tokenizer=arg.tokenizer,
            template="qwen2_vl",
            seq_len=seq_len,
            max_patches=max_patches,  # patches per packed row (4 per LM image token)
            max_images=1,
            packing_bins=32,
            streams=0,
            shuffle=True,
            worker_count=0,
            interleaved=dict(max_tokens=seq_len, max_images=1),
            image=dict(
                mode="native",
                min_pixels=56 * 56,
                max_pixels=28 * 28 * 1280,
                normalization="clip",
                max_aspect_ratio=200.0,
                video_frames=8,  # frames sampled per video, two per temporal patch
                video_min_pixels=128 * 28 * 28,
                video_max_pixels=768 * 28 * 28,
                # M-RoPE temporal step per frame pair: 1 (Qwen2-VL); Qwen2.5-VL: tokens_per_second (2) x 2 frames /
                # fps, 2.0 for 2 fps (the records carry no frame rate).
                video_time_interval=2.0 if qwen25 else 1.0,
            ),
        )
    )
    if arg.tokenizer:
        c.from_tokenizer = (("model.lm.vocab_size", "vocab_size"), ("model.image_token_id", "<|image_pad|>"))
    c.optim = ConfigDict(
        dict(
            name="adamw",
            lr=3e-3 if tiny else 1e-5,
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
    """The tiny Qwen2-VL (or, `variant=tiny-2.5`, Qwen2.5-VL) on the built-in dataset (a declared prerequisite,
    built when training starts): captions, VQA and grounding conversations in Qwen2-VL chat, each 112 px image
    at its native resolution (8 x 8 patches -> 16 LM tokens), rows of 192 tokens and 256 patches, nothing
    frozen, VQA and caption evaluations on held-out combinations."""
    from data_pipelines.builtin import build

    root = "prerequisite:builtin"
    c = get_config(f"variant={arg.variant},tokenizer={root}/{build.TOKENIZER}.model,data={root}")
    c.prerequisites = {"builtin": dict(kind="builtin_data", seed=0, image_size=112, scale=float(arg.scale))}
    steps = max(4, round(300 * float(arg.scale)))
    c.total_steps, c.batch_size, c.log_every = steps, 16, 50
    c.checkpoint_every, c.eval_every, c.eval_examples = steps, steps, 100
    c.data.seq_len, c.data.max_patches = 192, 256
    c.data.mixture, c.eval_tasks, c.eval_baselines = build.chat_tasks(root)
    c.optim.update(lr=2e-3, warmup_steps=20)
    return c
