"""PaliGemma (Beyer et al. 2024, arXiv:2407.07726): SigLIP-So400m/14 tokens, one linear map, Gemma-2B as a prefix-LM.

Variants (`--config configs/paligemma.py:variant=NAME[,stage=S][,data=DIR,tokenizer=FILE.model,init=CKPT]`;
`configs/paligemma.py:data=builtin[,scale=F]` trains the tiny model on the built-in dataset):
  tiny     a 2-layer SigLIP-style ViT (patch 8, 32 px: 16 tokens), a 2-layer Gemma-style LM with one KV head
  3b-224   SigLIP So400m/14 at 224 px (256 image tokens) + Gemma-2B: PaliGemma-3B, 2.92B parameters
  3b-448   the same at 448 px (1024 image tokens)
  3b-896   the same at 896 px (4096 image tokens)

Stages (paper sec. 3.2; big_vision configs/proj/paligemma/README.md). Nothing is frozen in any stage: the
paper trains every part from Stage1 on, unlike PaLI-3 and LLaVA, which freeze the image encoder.
  stage=1         multimodal pretraining at 224 px, text length 128 (1B examples in the paper; here
                  1B / batch steps), starting from SigLIP and Gemma checkpoints (`model.vision_checkpoint`,
                  its pooling head dropped, and `model.lm_checkpoint`: `vlm-jax convert-hf` outputs of
                  SigLIP-So400m/14 and Gemma-2B; the LM checkpoint must already have the 257216 embedding rows:
                  Gemma's 256000 plus the 1216 `<loc>` / `<seg>` / padding rows, which nothing here appends).
                  The paper warms the image encoder's learning rate up slowly;
                  `optim.lr_mults` is a constant factor, so that warm-up is not reproduced (one schedule).
  stage=2         resolution increase: 448 px for 50M examples, then 896 px for 10M, text length 512,
                  starting from the previous stage's checkpoint (`init=CKPT` -> `model.stage_checkpoint`; the ViT
                  position embedding is resampled to the new grid).
  stage=transfer  fine-tuning on one task from a pretrained checkpoint (`init=CKPT`), every part training, with
                  big_vision's COCO-captions transfer settings (transfers/cococap.py, its best sweep: lr 1e-5,
                  weight decay 1e-6, cosine with 5% warm-up, Adam b2 0.999, clip 1.0, batch 256; text length 32
                  there, 128 here for longer answers). `total_steps` is a placeholder: set it to the task's epochs.
The default stage follows the variant (tiny: transfer, 3b-224: 1, 3b-448 / 3b-896: 2). Batch size and learning
rate of stages 1 and 2 are ours (the pretraining configs are not public).

Data: the "paligemma" template (`<image>`s, `<bos>{prefix}\\n{suffix}<eos>`, prefix-LM mask, loss on the
suffix); task prefixes "caption en" for caption pairs and "answer en {question}" for question/answer records
(a record with LLaVA `conversations`, as the built-in VQA records have, keeps its question as the prefix).
Images are resized to the square resolution (bilinear, big_vision's `resize(res)`) and scaled to [-1, 1] (SigLIP).
`model.image_tokens` and `data.seq_len` (image tokens + text length) derive from `model.image_size`.
Vocabulary: the published checkpoints have 257216 rows (Gemma's 256000 pieces, 1024 `<loc>` and 128 `<seg>`
pieces, padded) with `<image>` at 257152 (the Hugging Face config of google/paligemma-3b-pt-224); with
`tokenizer=` the `<image>` id is the tokenizer's (and for tiny the vocabulary size too), read when the config is
resolved (vlm_jax/prerequisites.py).
"""

from ml_collections import FieldReference

from vlm_jax.config_lib import ConfigDict, ConfigError, compute_dtype, module_defaults, parse_arg, training_config
from vlm_jax.encoders.vit import ViT
from vlm_jax.lm.decoder import DecoderLM

# Gemma-2B (Gemma Team 2024, arXiv:2403.08295, table 1): width 2048, 18 layers, 8 heads, 1 KV head, head_dim 256,
# GeGLU MLP 16384 (table 1's "feedforward hidden dims" 32768 counts gate and up together), RMSNorm eps 1e-6.
GEMMA_2B = dict(
    vocab_size=257216, embed_dim=2048, num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256, mlp_dim=16384
)
RESOLUTIONS = {"3b-224": 224, "3b-448": 448, "3b-896": 896}
STAGES = ("1", "2", "transfer")
TEXT_LEN = {"1": 128, "2": 512, "transfer": 128}
STAGE_EXAMPLES = {"1": 1_000_000_000, "2": {448: 50_000_000, 896: 10_000_000}}


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny", stage="", data="", tokenizer="", init="", scale=1.0)
    tiny = arg.variant == "tiny"
    if not tiny and arg.variant not in RESOLUTIONS:
        raise ConfigError(f"variant {arg.variant!r} is not one of tiny, {', '.join(RESOLUTIONS)}.")
    size = 32 if tiny else RESOLUTIONS[arg.variant]
    stage = arg.stage or ("transfer" if tiny else "1" if size == 224 else "2")
    if stage not in STAGES:
        raise ConfigError(f"stage={stage} is not 1 (pretraining), 2 (resolution increase) or transfer.")
    if not tiny and (stage == "1") != (size == 224):
        raise ConfigError(f"stage={stage} runs at {'224' if stage == '1' else '448 or 896'} px, not {size} px.")
    if arg.data == "builtin":
        if not tiny:
            raise ConfigError("data=builtin trains the tiny model; paper-size variants need data=DIR,tokenizer=FILE.")
        return builtin(arg)

    batch_size = 8 if tiny else 256
    c = training_config(
        total_steps=60 if tiny else _steps(stage, size, batch_size),
        batch_size=batch_size,
        mesh="data=-1,fsdp=1,tensor=1" if tiny else "data=-1,fsdp=8,tensor=1",
    )

    vit = module_defaults(ViT)
    lm = dict(module_defaults(DecoderLM, exclude=("cross_attn_every",)), head_dim=0)  # 0 = embed_dim // heads
    image_size = FieldReference(size)
    if tiny:
        patch, text_len = 8, FieldReference(48)
        vit.update(variant="", width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=patch)
        lm.update(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=1, mlp_dim=128)
    else:
        patch, text_len = 14, FieldReference(TEXT_LEN[stage])
        vit.update(variant="So400m/14")
        lm.update(GEMMA_2B)
    # SigLIP's vision tower: learned position embedding, no class token, LayerNorm eps 1e-6, tanh GELU, the
    # post-LayerNormed tokens (transformers' last_hidden_state), no attention-pooling head.
    vit.update(
        image_size=image_size, pool="none", class_token=False, pre_norm=False, final_norm=True, norm_tokens=True,
        norm_eps=1e-6, mlp_act="gelu_tanh", posemb="learn", patch_bias=True, attn_bias=True,
    )  # fmt: skip
    # Gemma: GeGLU (tanh GELU), embeddings scaled by sqrt(width), head tied to the embeddings, RMSNorm eps 1e-6.
    lm.update(mlp_act="gelu_tanh", embed_scale=True, tie_embeddings=True, norm_eps=1e-6, rope_theta=10000.0)
    image_tokens = (image_size // patch) * (image_size // patch)
    compute_dtype(vit, lm, tiny=tiny)
    c.model = ConfigDict(
        dict(
            name="paligemma",
            encoder="vit",
            encoder_kwargs=vit,
            feature_layer=None,  # the encoder's final tokens
            drop_class_token=False,
            connector=dict(kind="linear"),
            lm=lm,
            image_size=image_size,
            image_tokens=image_tokens,
            image_token_id=3 if tiny else 257152,  # the tokenizer's "<image>" once resolved
            stage_checkpoint=arg.init,  # an earlier paligemma stage: starts every part (stage 2, transfer)
            lm_checkpoint="",  # an `lm` checkpoint (e.g. convert-hf of Gemma-2B) for stage 1
            vision_checkpoint="",  # a `vision_encoder` or `dual_encoder` checkpoint (convert-hf of SigLIP)
        )
    )
    c.data = ConfigDict(
        dict(
            name="grain",
            source="array_record",
            train_path=arg.data,
            validation_path=arg.data,
            tokenizer=arg.tokenizer,
            template="paligemma",
            seq_len=image_tokens + text_len,
            max_images=1,
            packing_bins=32,
            streams=0,  # data streams the records are dealt to; 0 = one per process (docs/data.md)
            shuffle=True,
            worker_count=0,
            image=dict(mode="fixed", size=image_size, method="bilinear", normalization="siglip", max_aspect_ratio=20.0),
        )
    )
    if arg.tokenizer:
        image_id = (("model.image_token_id", "<image>"),)
        c.from_tokenizer = ((("model.lm.vocab_size", "vocab_size"),) if tiny else ()) + image_id
    transfer = stage == "transfer"
    c.optim = ConfigDict(
        dict(
            name="adamw",
            lr=3e-3 if tiny else (1e-5 if transfer else 1e-4),
            schedule="cosine",
            warmup_steps=5 if tiny else (c.total_steps // 20 if transfer else 1000),
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=1e-6 if transfer and not tiny else 0.0,
            wd_exclude=(),
            clip_norm=1.0,
            freeze=(),  # every part trains in every stage
            lr_mults=(),
        )
    )
    return c


def _steps(stage: str, size: int, batch_size: int) -> int:
    """Steps of the paper's example budget for a stage at `size` px (transfer: a placeholder of 10000)."""
    if stage == "transfer":
        return 10_000
    examples = STAGE_EXAMPLES[stage] if stage == "1" else STAGE_EXAMPLES[stage][size]
    return examples // batch_size


def builtin(arg):
    """The tiny PaliGemma on the built-in dataset (`data_pipelines/builtin`, declared as a prerequisite and built
    when training starts): captions, VQA and grounding through the "paligemma" template, every part training
    from scratch (nothing pretrained exists offline), with the VQA and caption evaluations on held-out
    combinations beside the model-free baselines, at the built-in scenes' 64 px (64 image tokens)."""
    from data_pipelines.builtin import build

    root = "prerequisite:builtin"
    c = get_config(f"variant=tiny,stage=transfer,tokenizer={root}/{build.TOKENIZER}.model,data={root}")
    c.prerequisites = {"builtin": dict(kind="builtin_data", seed=0, image_size=64, scale=float(arg.scale))}
    c.total_steps, c.batch_size, c.log_every = 300, 16, 50
    c.checkpoint_every, c.eval_every, c.eval_examples = 300, 300, 100
    c.model.image_size = 64
    c.data.seq_len = c.model.get_ref("image_tokens") + 96  # 64 image tokens + 96 text tokens
    c.data.mixture, c.eval_tasks, c.eval_baselines = build.chat_tasks(root)
    c.optim.update(lr=2e-3, warmup_steps=20)
    return c
