"""DeepSeek-VL (Lu et al. 2024, arXiv:2403.05525): SigLIP-L at 384 px (+ SAM-B at 1024 px, the "hybrid" vision
encoder), an aligner, a DeepSeek LLM (LLaMA-shaped), 576 `<image_placeholder>` features per image.

Variants (`--config configs/deepseek_vl.py:variant=NAME[,stage=1|2|3][,data=DIR,tokenizer=FILE.model]`;
`configs/deepseek_vl.py:data=builtin[,scale=F]` trains the tiny hybrid model on the built-in dataset):
  tiny       the hybrid model at test size: a 2-layer SigLIP-style ViT on 32 px views (patch 8: 16 features), a
             4-layer SAM-style ViT on 64 px slots (patch 8, 3 x 3 windows, global layers 1 and 3), the hybrid
             aligner, a 2-layer LM: CPU tests
  tiny-1.3b  the same without the SAM branch (DeepSeek-VL-1.3B's shape): 32 px slots, the 2-layer MLP aligner
  1.3b       DeepSeek-VL-1.3B: SigLIP-L/16 at 384 px (no pooling head), aligner linear-GELU-linear,
             DeepSeek-LLM-1.3B (width 2048, 24 layers, 16 heads, MLP 5632, vocabulary 102400)
  7b         DeepSeek-VL-7B: SigLIP-L/16 at 384 px + SAM-B at 1024 px, the hybrid aligner (each branch to 2048,
             concatenated, GELU, 4096 -> 4096), DeepSeek-LLM-7B (width 4096, 30 layers, 32 heads, MLP 11008)
Shapes are those transformers' conversion scripts write for deepseek-ai/deepseek-vl-{1.3b,7b}-chat
(`convert_deepseek_vl_weights_to_hf.py`, `convert_deepseek_vl_hybrid_weights_to_hf.py`: the LLM widths, depths,
heads and MLP widths above, SigLIP-L/16 at 384 px with vision_use_head=False, SAM-B's defaults); RMSNorm eps
1e-6, RoPE theta 10000 and the untied head are DeepSeek LLM's; context 4096 as DeepSeek-VL trains.

Slots: the hybrid model's image slot is the 1024 px view, padded to a square with the CLIP mean colour and
CLIP-normalised (`data.image.mode="deepseek_vl"`, as `DeepseekVLHybridImageProcessor`); the 384 px SigLIP view is
derived from it inside the model (`vlm_jax/models/deepseek_vl.py`). The SigLIP-only model's slot is the 384 px
view, SigLIP-normalised.

Stages (arXiv:2403.05525 sec. 3.2; the split is in the seed notes): stage=1 trains the aligner alone (the vision
encoders and the LLM frozen); stage=2 joint pretraining trains the aligner and the LLM (encoders frozen);
stage=3 supervised fine-tuning trains SigLIP, the aligner and the LLM with SAM-B frozen. The learning
rates and batch sizes per stage (1e-3 / 4.2e-5 (7B), 3e-4 (1.3B) / 2e-5; 256 / 2304 / 256) are written from
memory of the paper's hyperparameter table and could not be checked offline: treat them as assumptions. The data
mixture and the 7:3 multimodal:language ratio are the user's data.
"""

from ml_collections import FieldReference

from vlm_jax.config_lib import ConfigDict, ConfigError, compute_dtype, module_defaults, parse_arg, training_config
from vlm_jax.encoders.sam import SAMEncoder
from vlm_jax.encoders.vit import ViT
from vlm_jax.lm.decoder import DecoderLM

# DeepSeek LLM shapes: width, layers, heads, MLP width (vocabulary 102400; kv heads = heads).
LMS = {"1.3b": (2048, 24, 16, 5632), "7b": (4096, 30, 32, 11008)}
#          LM, hybrid (SAM-B), stage lrs (1, 2, 3), stage batch sizes
VARIANTS = {
    "1.3b": ("1.3b", False, (1e-3, 3e-4, 2e-5), (256, 2304, 256)),
    "7b": ("7b", True, (1e-3, 4.2e-5, 2e-5), (256, 2304, 256)),
}
TINY = ("tiny", "tiny-1.3b")
VISION, SAM, LM = ("vision/.*",), ("high_res/.*",), ("decoder/.*",)
# Frozen by stage: 1 the aligner alone trains; 2 the aligner and the LLM; 3 all but SAM-B.
FREEZE = {1: VISION + SAM + LM, 2: VISION + SAM, 3: SAM}


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny", stage=3, data="", tokenizer="", scale=1.0)
    if arg.variant not in TINY and arg.variant not in VARIANTS:
        raise ConfigError(f"variant {arg.variant!r} is not one of {', '.join(TINY + tuple(VARIANTS))}.")
    if arg.stage not in FREEZE:
        raise ConfigError(f"stage={arg.stage} is not 1 (aligner), 2 (joint pretraining) or 3 (fine-tuning).")
    if arg.data == "builtin":
        if arg.variant not in TINY:
            raise ConfigError("data=builtin trains tiny or tiny-1.3b; paper sizes need data=DIR,tokenizer=FILE.")
        return builtin(arg)
    tiny = arg.variant in TINY
    hybrid = arg.variant in ("tiny", "7b")
    lrs, batches = (3e-3, 3e-3, 3e-3), (8, 8, 8)
    if not tiny:
        lrs, batches = VARIANTS[arg.variant][2:]
    c = training_config(
        total_steps=60 if tiny else 5000,
        batch_size=batches[arg.stage - 1],
        mesh="data=-1,fsdp=1,tensor=1" if tiny else "data=-1,fsdp=8,tensor=1",
    )
    vit = module_defaults(ViT)
    sam = module_defaults(SAMEncoder)
    lm = dict(module_defaults(DecoderLM, exclude=("cross_attn_every",)), head_dim=0)  # 0 = embed_dim // heads
    if tiny:
        low, patch, high, seq_len = FieldReference(32), 8, 64, FieldReference(96)
        vit.update(variant="", width=32, depth=2, mlp_dim=64, num_heads=2)
        sam.update(variant="", width=32, depth=4, num_heads=2, global_layers=(1, 3), mlp_dim=64, patch_size=8,
                   image_size=high, window=3, out_channels=8)  # fmt: skip
        lm.update(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
    else:
        low, patch, high, seq_len = FieldReference(384), 16, 1024, FieldReference(4096)
        vit.update(variant="L/16")
        sam.update(variant="B", mlp_dim=3072)  # SAM-B: width 768, 12 layers, global attention in 2, 5, 8, 11
        width, layers, heads, mlp = LMS[VARIANTS[arg.variant][0]]
        lm.update(
            vocab_size=102400, embed_dim=width, num_layers=layers, num_heads=heads, num_kv_heads=heads, mlp_dim=mlp,
            norm_eps=1e-6, tie_embeddings=False,
        )  # fmt: skip
    # SigLIP's tower: no class token, learned positions, final LayerNorm, exact GELU (DeepSeek-VL's timm SigLIP;
    # transformers' conversion writes hidden_act="gelu"); DeepSeek-VL drops its pooling head.
    vit.update(
        patch_size=patch, image_size=low, pool="none", class_token=False, norm_eps=1e-6, mlp_act="gelu",
        posemb_resample="bicubic",
    )  # fmt: skip
    parts = (vit, lm, sam) if hybrid else (vit, lm)
    compute_dtype(*parts, tiny=tiny)
    c.model = ConfigDict(
        dict(
            name="deepseek_vl",
            encoder_kwargs=vit,
            sam=sam if hybrid else {},
            lm=lm,
            low_res_size=low,
            image_size=high if hybrid else low,
            image_tokens=(low // patch) * (low // patch),
            image_token_id=3,  # the tokenizer's "<image_placeholder>" once resolved; 3 without one (tests)
            low_res_normalization="siglip",
            high_res_normalization="clip",
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
            template="deepseek_vl",
            seq_len=seq_len,
            max_images=1,
            packing_bins=32,
            streams=0,  # data streams the records are dealt to; 0 = one per process (docs/data.md)
            shuffle=True,
            worker_count=0,
            interleaved=dict(max_tokens=seq_len, max_images=1),
            image=dict(
                mode="deepseek_vl",
                size=high if hybrid else low,
                method="bicubic",
                normalization="clip" if hybrid else "siglip",
                max_aspect_ratio=20.0,
            ),
        )
    )
    if arg.tokenizer:
        c.from_tokenizer = (("model.lm.vocab_size", "vocab_size"), ("model.image_token_id", "<image_placeholder>"))
    c.optim = ConfigDict(
        dict(
            name="adamw",
            lr=lrs[arg.stage - 1],
            schedule="cosine",  # assumption: the paper gives step decay for stage 2; cosine is this codebase's
            warmup_steps=5 if tiny else 128,
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.0,
            wd_exclude=(),
            clip_norm=1.0,
            freeze=tuple(p for p in FREEZE[arg.stage] if hybrid or p not in SAM),  # 1.3b has no SAM-B to freeze
            lr_mults=(),
        )
    )
    return c


def builtin(arg):
    """The tiny DeepSeek-VL (hybrid, or `variant=tiny-1.3b`) on the built-in dataset (a declared prerequisite,
    built when training starts): captions, VQA and grounding conversations in DeepSeek-VL's chat, every 64 px
    scene one slot (the hybrid model's SAM view; its SigLIP view 32 px), everything trained (nothing pretrained
    exists offline), VQA and caption evaluations on held-out combinations."""
    from data_pipelines.builtin import build

    root = "prerequisite:builtin"
    c = get_config(f"variant={arg.variant},stage=3,tokenizer={root}/{build.TOKENIZER}.model,data={root}")
    c.prerequisites = {"builtin": dict(kind="builtin_data", seed=0, image_size=64, scale=float(arg.scale))}
    steps = max(4, round(300 * float(arg.scale)))
    c.total_steps, c.batch_size, c.log_every = steps, 16, 50
    c.checkpoint_every, c.eval_every, c.eval_examples = steps, steps, 100
    c.data.seq_len, c.data.max_images = 160, 2  # room for two examples per packed row
    # DeepSeek-VL's long system message (~40 pieces with the built-in 512-piece vocabulary) would leave little room.
    c.data.template_options = {"system": "A chat between a user and an assistant."}
    c.data.image.method = "bilinear"
    c.data.mixture, c.eval_tasks, c.eval_baselines = build.chat_tasks(root)
    c.optim.update(lr=2e-3, warmup_steps=20, freeze=())
    return c
