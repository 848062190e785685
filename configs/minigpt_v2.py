"""MiniGPT-v2 (Chen et al. 2023, arXiv:2310.09478): EVA ViT-g/14 at 448 px, 4 adjacent tokens concatenated and
projected by one linear layer into LLaMA-2-7B-chat.

Variants (`--config configs/minigpt_v2.py:variant=NAME[,data=DIR,tokenizer=FILE.model]`;
`configs/minigpt_v2.py:data=builtin[,scale=F]` trains the tiny model on the built-in dataset):
  tiny  a 2-layer ViT (patch 8, 32 px: 16 patches -> 4 tokens), a 2-layer LM: CPU tests
  7b    EVA ViT-g/14 as MiniGPT-4 / BLIP-2 use it (39 blocks of width 1408, the last of EVA-CLIP's 40 removed,
        then `ln_vision`), 448 px -> 1024 patches -> 256 tokens of width 5632 -> linear -> LLaMA-2-7B (4096 wide)

The paper trains in three stages, the vision encoder always frozen: (1) pretraining on weakly labelled and
fine-grained data, (2) multi-task training on fine-grained data, (3) multi-modal instruction tuning; the linear
layer and the LM (with LoRA in the paper; here the whole LM unless `optim.freeze` says otherwise) train.
Prompts follow MiniGPT's "minigpt4" template (`<ImageHere>` placeholders; the paper adds task identifiers such
as "[vqa]" to the instruction, which is text).
"""

from ml_collections import FieldReference

from vlm_jax.config_lib import ConfigDict, ConfigError, compute_dtype, module_defaults, parse_arg, training_config
from vlm_jax.encoders.vit import ViT
from vlm_jax.lm.decoder import DecoderLM

GROUP = 4  # tokens concatenated into one


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny", data="", tokenizer="", scale=1.0)
    if arg.variant not in ("tiny", "7b"):
        raise ConfigError(f"variant {arg.variant!r} is not one of tiny, 7b.")
    if arg.data == "builtin":
        if arg.variant != "tiny":
            raise ConfigError("data=builtin trains the tiny model; the 7b variant needs data=DIR,tokenizer=FILE.")
        return builtin(arg)
    tiny = arg.variant == "tiny"
    c = training_config(
        total_steps=60 if tiny else 400_000,
        batch_size=8 if tiny else 96,
        mesh="data=-1,fsdp=1,tensor=1" if tiny else "data=-1,fsdp=8,tensor=1",
    )

    vit = module_defaults(ViT)
    lm = dict(module_defaults(DecoderLM, exclude=("cross_attn_every",)), head_dim=0)
    if tiny:
        image_size, patch, seq_len = FieldReference(32), 8, FieldReference(64)
        vit.update(variant="", width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=patch)
        lm.update(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
    else:
        image_size, patch, seq_len = FieldReference(448), 14, FieldReference(1024)
        vit.update(variant="g/14", depth=39)  # EVA ViT-g without its last block
        lm.update(
            vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008,
            norm_eps=1e-5,
        )  # fmt: skip
    vit.update(image_size=image_size, norm_eps=1e-6, mlp_act="gelu", pool="cls")
    compute_dtype(vit, lm, tiny=tiny)
    c.model = ConfigDict(
        dict(
            name="minigpt_v2",
            encoder="vit",
            encoder_kwargs=vit,
            feature_layer=None,  # the final tokens, after the ViT's final LayerNorm (MiniGPT's ln_vision)
            drop_class_token=True,
            connector=dict(kind="concat", group=GROUP),
            lm=lm,
            image_size=image_size,
            image_tokens=(image_size // patch) * (image_size // patch) // GROUP,
            image_token_id=3,  # the tokenizer's "<ImageHere>" once resolved; 3 without one (tests)
            lm_checkpoint="",
            vision_checkpoint="",
        )
    )
    c.data = ConfigDict(
        dict(
            name="grain",
            source="array_record",
            train_path=arg.data,
            validation_path=arg.data,
            tokenizer=arg.tokenizer,
            template="minigpt4",
            seq_len=seq_len,
            max_images=1,
            packing_bins=32,
            streams=0,  # data streams the records are dealt to; 0 = one per process (docs/data.md)
            shuffle=True,
            worker_count=0,
            interleaved=dict(max_tokens=seq_len, max_images=1),
            image=dict(mode="fixed", size=image_size, method="bicubic", normalization="clip", max_aspect_ratio=20.0),
        )
    )
    if arg.tokenizer:
        c.from_tokenizer = (("model.lm.vocab_size", "vocab_size"), ("model.image_token_id", "<ImageHere>"))
    c.optim = ConfigDict(
        dict(
            name="adamw",
            lr=3e-3 if tiny else 1e-4,
            schedule="cosine",
            warmup_steps=5 if tiny else 1000,
            min_lr_ratio=0.1,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.05,
            wd_exclude=(),
            clip_norm=1.0,
            freeze=("vision/.*",),  # the vision encoder stays frozen in every stage
            lr_mults=(),
        )
    )
    return c


def builtin(arg):
    """The tiny MiniGPT-v2 on the built-in dataset (a declared prerequisite, built when training starts): one
    stage on captions, VQA and grounding conversations with MiniGPT's template, nothing frozen
    (nothing pretrained exists offline), 64 px images (64 patches -> 16 tokens), VQA and caption evaluations
    on held-out combinations."""
    from data_pipelines.builtin import build

    root = "prerequisite:builtin"
    c = get_config(f"variant=tiny,tokenizer={root}/{build.TOKENIZER}.model,data={root}")
    c.prerequisites = {"builtin": dict(kind="builtin_data", seed=0, image_size=64, scale=float(arg.scale))}
    steps = max(4, round(300 * float(arg.scale)))
    c.total_steps, c.batch_size, c.log_every = steps, 16, 50
    c.checkpoint_every, c.eval_every, c.eval_examples = steps, steps, 100
    c.model.image_size = 64
    c.data.seq_len = 128
    c.data.image.method = "bilinear"
    c.data.mixture, c.eval_tasks, _ = build.chat_tasks(root)
    c.optim.update(lr=2e-3, warmup_steps=20, freeze=())
    return c
