"""Qwen-VL / Qwen-VL-Chat (Bai et al. 2023, arXiv:2308.12966): ViT-bigG/14, a one-layer cross-attention resampler
with 256 queries, Qwen-7B.

Variants (`--config configs/qwen_vl.py:variant=NAME[,stage=1|2|3][,data=DIR,tokenizer=FILE.model]`;
`configs/qwen_vl.py:data=builtin[,scale=F]` trains the tiny model on the built-in dataset):
  tiny  a 2-layer ViT (32 px, patch 8: 16 tokens), a resampler of 4 queries, a 2-layer LM: CPU tests
  7b    Qwen-VL (9.6B, the paper's table 1): OpenCLIP ViT-bigG/14 (1.9B; 48 layers of width 1664, MLP 8192,
        no class token, ln_pre) at 448 px (stage 1 at 224 px: `stage=1`), the adapter (0.08B: 256 queries of
        width 4096, 32 heads), Qwen-7B (7.7B: 32 layers of width 4096, MLP 11008, q/k/v biases, vocabulary
        151936)

Stages (sec. 3): 1 pretraining on image-text pairs at 224 px, the LM frozen; 2 multi-task pretraining at 448
px, everything trained; 3 supervised fine-tuning (Qwen-VL-Chat), the ViT frozen. Stage 1's batch size 30720
and 50,000 steps are the paper's; its learning rates (2e-4, 5e-5, 1e-5, cosine, AdamW b2 0.95, weight decay
0.05) are its table 8's.
"""

from ml_collections import FieldReference

from vlm_jax.config_lib import ConfigDict, ConfigError, compute_dtype, module_defaults, parse_arg, training_config
from vlm_jax.encoders.vit import ViT
from vlm_jax.lm.decoder import DecoderLM

STAGES = {1: ("decoder/.*",), 2: (), 3: ("vision/.*",)}  # frozen parts by stage


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny", stage=3, data="", tokenizer="", scale=1.0)
    if arg.variant not in ("tiny", "7b"):
        raise ConfigError(f"variant {arg.variant!r} is not one of tiny, 7b.")
    if arg.stage not in STAGES:
        raise ConfigError(f"stage={arg.stage} is not 1 (pretraining), 2 (multi-task) or 3 (fine-tuning).")
    if arg.data == "builtin":
        if arg.variant != "tiny":
            raise ConfigError("data=builtin trains the tiny model; the 7b variant needs data=DIR,tokenizer=FILE.")
        return builtin(arg)
    tiny = arg.variant == "tiny"
    c = training_config(
        total_steps=60 if tiny else 50_000,
        batch_size=8 if tiny else 30720 if arg.stage == 1 else 4096,
        mesh="data=-1,fsdp=1,tensor=1" if tiny else "data=-1,fsdp=8,tensor=1",
    )
    vit = module_defaults(ViT)
    lm = dict(module_defaults(DecoderLM, exclude=("cross_attn_every",)), head_dim=0)
    if tiny:
        image_size, queries, seq_len = FieldReference(32), FieldReference(4), FieldReference(64)
        vit.update(variant="", width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)
        lm.update(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
        resampler = dict(queries=queries, head_dim=16)
    else:
        image_size, queries, seq_len = (
            FieldReference(224 if arg.stage == 1 else 448),
            FieldReference(256),
            FieldReference(2048),
        )
        vit.update(variant="bigG/14")
        lm.update(
            vocab_size=151936, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008,
            qkv_bias=True, norm_eps=1e-6,
        )  # fmt: skip
        resampler = dict(queries=queries, head_dim=128)
    # OpenCLIP's ViT as Qwen-VL keeps it: no class token, ln_pre, no final norm, a bias-free patch embedding.
    vit.update(
        image_size=image_size, pool="none", class_token=False, pre_norm=True, final_norm=False, norm_eps=1e-6,
        mlp_act="gelu", patch_bias=False, posemb_resample="bicubic",
    )  # fmt: skip
    compute_dtype(vit, lm, resampler, tiny=tiny)
    c.model = ConfigDict(
        dict(
            name="qwen_vl",
            encoder="vit",
            encoder_kwargs=vit,
            feature_layer=None,  # the last block's tokens
            drop_class_token=False,
            connector=dict(kind="xattn_resampler", **resampler),
            lm=lm,
            image_size=image_size,
            image_tokens=queries,  # one source: the resampler's query count
            image_token_id=3,  # the tokenizer's "<imgpad>" once resolved; 3 without one (tests)
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
            template="qwen_vl",
            seq_len=seq_len,
            max_images=1,
            packing_bins=32,
            streams=0,
            shuffle=True,
            worker_count=0,
            interleaved=dict(max_tokens=seq_len, max_images=1),
            image=dict(mode="fixed", size=image_size, method="bicubic", normalization="clip", max_aspect_ratio=20.0),
        )
    )
    if arg.tokenizer:
        c.from_tokenizer = (("model.lm.vocab_size", "vocab_size"), ("model.image_token_id", "<imgpad>"))
    c.optim = ConfigDict(
        dict(
            name="adamw",
            lr=3e-3 if tiny else {1: 2e-4, 2: 5e-5, 3: 1e-5}[arg.stage],
            schedule="cosine",
            warmup_steps=5 if tiny else 500,
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.05,
            wd_exclude=(),
            clip_norm=1.0,
            freeze=STAGES[arg.stage],
            lr_mults=(),
        )
    )
    return c


def builtin(arg):
    """The tiny Qwen-VL on the built-in dataset (a declared prerequisite, built when training starts): captions,
    VQA and grounding conversations in Qwen-VL's ChatML, 64 px images (64 ViT tokens -> 16 resampled), nothing
    frozen, VQA and caption evaluations on held-out combinations."""
    from data_pipelines.builtin import build

    root = "prerequisite:builtin"
    c = get_config(f"variant=tiny,tokenizer={root}/{build.TOKENIZER}.model,data={root}")
    c.prerequisites = {"builtin": dict(kind="builtin_data", seed=0, image_size=64, scale=float(arg.scale))}
    steps = max(4, round(300 * float(arg.scale)))
    c.total_steps, c.batch_size, c.log_every = steps, 16, 50
    c.checkpoint_every, c.eval_every, c.eval_examples = steps, steps, 100
    c.model.image_size, c.model.connector.queries = 64, 16  # image_tokens follows the queries
    c.data.seq_len = 128
    c.data.image.method = "bilinear"
    c.data.mixture, c.eval_tasks, c.eval_baselines = build.chat_tasks(root)
    c.optim.update(lr=2e-3, warmup_steps=20, freeze=())
    return c
