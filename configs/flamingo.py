"""Flamingo (Alayrac et al. 2022): frozen vision encoder and LM, trained Perceiver resampler and GATED XATTN-DENSE.

Variants (`--config configs/flamingo.py:variant=NAME[,data=DIR,tokenizer=FILE.model][,train_new_tokens=True]`
[`,lm_checkpoint=DIR,vision_checkpoint=DIR`]; `configs/flamingo.py:data=builtin[,scale=S]` is the README's main
job, S scaling the built-in dataset's size):
  tiny  a small CLIP-style ViT, a 4-layer LM with cross-attention every 2 layers: CPU tests and the quick start
  3B    NFNet-F6 + the 1.4B Chinchilla-family LM (24 layers, width 2048), cross-attention every layer
  9B    NFNet-F6 + the 7.1B LM (32 layers, width 4096), cross-attention every 4th layer
  80B   NFNet-F6 + Chinchilla 70B (80 layers, width 8192), cross-attention every 7th layer (12 blocks)

Sizes follow the Flamingo paper's appendix (model hyper-parameters and the
per-component parameter table); tests/test_param_counts.py checks each
component against that table. Frozen: the vision encoder and every LM weight
(`optim.freeze`); trained: the resampler (`perceiver/`) and the cross-attention
blocks (`decoder/layer_groups*/xattn/`). Batches come from the Grain pipeline
over a `vlm-jax data build` folder, rendered with the "flamingo" template
(one `<image>` token per image, `<|endofchunk|>` after each text chunk).
`train_new_tokens=True` also trains the embedding rows of those two tokens
(`optim.trainable_rows`), as Flamingo learns its new tokens' embeddings.
`lm_checkpoint` / `vision_checkpoint` start the frozen parts from checkpoints
(an `lm` and a `vision_encoder` or `dual_encoder`, e.g. `vlm-jax convert-hf`
outputs; `model.lm` / `model.encoder_kwargs` must describe the same shapes).

Loading reads and builds nothing: with `tokenizer=FILE` the vocabulary size and
the `<image>` / `<|endofchunk|>` ids are `from_tokenizer` values, read when the
config is resolved, and the main job's data and pretrained LM are declared
prerequisites that the trainer resolves when training starts, once, cached
(vlm_jax/prerequisites.py; docs/training.md). Every option of the encoder, the
resampler, the LM and its cross-attention blocks is a key at the module's
default (`--config.model.lm.cross_attn.gate_init=1.0`), and keys that must agree
(image size, sequence length, image slots) are one reference.
"""

import os

from ml_collections import FieldReference

from vlm_jax import sharding
from vlm_jax.config_lib import ConfigDict, ConfigError, compute_dtype, load_config, module_defaults, parse_arg
from vlm_jax.connectors.perceiver import PerceiverResampler
from vlm_jax.encoders.nfnet import NFNet
from vlm_jax.encoders.vit import ViT
from vlm_jax.lm.decoder import DecoderLM
from vlm_jax.lm.gated_xattn import GatedCrossAttention

# Flamingo paper (Alayrac et al. 2022, arXiv:2204.14198), appendix tables 4 (hyper-parameters) and 5 (parameter
# counts). All sizes share a frozen NFNet-F6 (435M) and a trained 6-layer resampler of width 1536 (16 heads, 64
# latents, squared ReLU; 194M). The frozen LMs are Chinchilla-family transformers (Transformer-XL relative
# positions, RMSNorm, GELU MLP of 4x width, tied 32k embeddings); the GATED XATTN-DENSE blocks have the LM's width
# and heads with 128-wide heads and squared ReLU, before layers 0, n, 2n, ... ("starting from the very first
# layer"). Where the paper is silent or inconsistent we fit table 5 (docs/systems.md has the arithmetic):
# - resampler heads of 128 (the text says 96, which gives 170M, -12%) reading NFNet-F6's 3072-wide final
#   features through one linear map to 1536: 193.6M;
# - one shared linear map of the latents to the LM width ahead of every block's keys and values (keys and values
#   from 1536-wide latents give 1.16B for 3B, -3.5%);
# - 9B: the 7.1B LM of table 5 (32 layers, so 8 blocks), where table 4 lists 40 layers and 10 blocks.
LMS = {
    #      width, layers, heads, xattn_every
    "3B": (2048, 24, 16, 1),
    "9B": (4096, 32, 32, 4),
    "80B": (8192, 80, 64, 7),
}
FROZEN = (
    "vision/.*",
    "decoder/embed/.*",
    "decoder/layer_groups(_tail)?/layers/.*",
    "decoder/final_norm/.*",
    "decoder/lm_head/.*",
)


def get_config(arg=None):
    arg = parse_arg(
        arg,
        variant="tiny",
        data="",
        tokenizer="",
        vocab=256,
        train_new_tokens=False,
        lm_checkpoint="",
        vision_checkpoint="",
        scale=1.0,
    )
    if arg.variant != "tiny" and arg.variant not in LMS:
        raise ConfigError(f"variant {arg.variant!r} is not one of tiny, {', '.join(LMS)}.")
    if arg.data == "builtin":
        if arg.variant != "tiny":
            raise ConfigError("data=builtin is the tiny main job; paper-size variants need data=DIR,tokenizer=FILE.")
        return builtin_main_job(arg)
    c = ConfigDict()
    c.seed = 0
    c.total_steps = 60 if arg.variant == "tiny" else 250_000
    c.batch_size = 8 if arg.variant == "tiny" else 256
    c.grad_accum_steps = 1
    c.mesh = "data=-1,fsdp=1,tensor=1" if arg.variant == "tiny" else "data=-1,fsdp=16,tensor=1"
    c.logical_axis_rules = sharding.DEFAULT_RULES
    c.log_every = 10
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.max_consecutive_nonfinite = 10  # skipped non-finite updates in a row that stop the run; 0 = never
    c.schedule_steps = 0  # the learning-rate schedule's length; 0 = total_steps
    c.eval_every = 0
    c.eval_steps = 2
    c.peak_tflops = 0.0

    # Values read from the tokenizer when the config is resolved (vlm_jax/prerequisites.py): loading reads no file.
    from_tokenizer = ()
    vocab, media_token_id = int(arg.vocab), 3  # placeholders for configs without a tokenizer (parameter counts, tests)
    if arg.tokenizer:
        vocab = media_token_id = 0
        from_tokenizer = (("model.lm.vocab_size", "vocab_size"), ("model.media_token_id", "<image>"))
    elif arg.train_new_tokens:
        raise ConfigError("train_new_tokens needs tokenizer=FILE.model (it names the <image> and <|endofchunk|> ids).")

    # One source each: model.image_size, model.encoder_kwargs.image_size and data.image.size are one reference,
    # data.seq_len and data.interleaved.max_tokens another, data.max_images and data.interleaved.max_images a
    # third, so `--config.data.seq_len=256` (or any of the names) changes every place.
    # Every setting of the vision encoder, the resampler, the LM and its cross-attention blocks is a key, at the
    # module's default unless set here (`module_defaults`).
    xattn_defaults = module_defaults(GatedCrossAttention, exclude=("dtype", "decode"))  # the LM's dtype and mode
    lm_defaults = dict(module_defaults(DecoderLM), head_dim=0)  # 0 = embed_dim // num_heads
    if arg.variant == "tiny":
        image_size, seq_len, max_images = FieldReference(32), FieldReference(64), FieldReference(4)
        encoder = "vit"
        encoder_kwargs = dict(
            module_defaults(ViT), variant="", width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8,
            image_size=image_size, pre_norm=True, norm_eps=1e-5, mlp_act="quick_gelu",
        )  # fmt: skip
        resampler = dict(module_defaults(PerceiverResampler), depth=1, num_heads=2, head_dim=16, num_latents=4)
        lm = dict(
            lm_defaults, vocab_size=vocab, embed_dim=64, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=128,
            cross_attn_every=2, cross_attn=dict(xattn_defaults, num_heads=2, head_dim=16),
        )  # fmt: skip
    else:
        width, layers, heads, every = LMS[arg.variant]
        # Flamingo pretrains NFNet-F6 at 288/320 px
        image_size, seq_len, max_images = FieldReference(320), FieldReference(2048), FieldReference(5)
        encoder = "nfnet"
        encoder_kwargs = dict(module_defaults(NFNet), variant="F6", num_classes=0)
        resampler = dict(
            module_defaults(PerceiverResampler), depth=6, num_heads=16, head_dim=128, num_latents=64,
            ff_act="sqrelu", width=1536,
        )  # fmt: skip
        lm = dict(
            lm_defaults, vocab_size=32000, embed_dim=width, num_layers=layers, num_heads=heads, num_kv_heads=heads,
            mlp_dim=4 * width, mlp="plain", mlp_act="gelu", position_embedding="relative", tie_embeddings=True,
            cross_attn_every=every, cross_attn=dict(xattn_defaults, num_heads=heads, head_dim=128, ff_act="sqrelu"),
        )  # fmt: skip
    compute_dtype(encoder_kwargs, resampler, lm, tiny=arg.variant == "tiny")
    c.model = ConfigDict(
        dict(
            name="flamingo",
            encoder=encoder,
            encoder_kwargs=encoder_kwargs,
            image_size=image_size,
            resampler=resampler,
            lm=lm,
            media_token_id=media_token_id,
            only_attend_immediate_media=True,
            project_media=arg.variant != "tiny",
            image_tokens=1,
            lm_checkpoint=arg.lm_checkpoint,  # an `lm` checkpoint (e.g. from convert-hf) for the frozen LM
            vision_checkpoint=arg.vision_checkpoint,  # a `vision_encoder` or `dual_encoder` checkpoint
        )
    )
    c.data = ConfigDict(
        dict(
            name="grain",
            source="array_record",
            train_path=arg.data,
            validation_path=arg.data,
            tokenizer=arg.tokenizer,
            template="flamingo",
            seq_len=seq_len,
            max_images=max_images,
            packing_bins=32,
            streams=0,  # data streams the records are dealt to; 0 = one per process (docs/data.md)
            shuffle=True,
            worker_count=0,
            interleaved=dict(max_tokens=seq_len, max_images=max_images),
            image=dict(mode="fixed", size=image_size, method="bicubic", normalization="clip", max_aspect_ratio=20.0),
        )
    )
    c.optim = ConfigDict(
        dict(
            name="adamw",
            lr=1e-3 if arg.variant == "tiny" else 1e-4,
            schedule="linear",
            warmup_steps=5 if arg.variant == "tiny" else 5000,
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.1,
            wd_exclude=(".*latents",),  # matrices decay, vectors and scalars (gates, norms) never
            clip_norm=1.0,
            # a tied head is the embedding: there is no decoder/lm_head to freeze (and a pattern must match)
            freeze=tuple(p for p in FROZEN if p != "decoder/lm_head/.*") if lm["tie_embeddings"] else FROZEN,
            lr_mults=(),
        )
    )
    if arg.train_new_tokens:  # the embedding trains, but only the rows of <image> and <|endofchunk|>
        c.optim.freeze = tuple(p for p in FROZEN if p != "decoder/embed/.*")
        c.optim.trainable_rows = (("decoder/embed/embedding", ()),)
        from_tokenizer += (("optim.trainable_rows.0.1", ("<image>", "<|endofchunk|>")),)
    if from_tokenizer:
        c.from_tokenizer = from_tokenizer
    return c


# The built-in dataset's tasks in the main job's training mixture, with their weights.
MAIN_JOB_MIXTURE = {"captions": 2.0, "vqa": 3.0, "grounding": 0.5, "interleaved": 0.5, "fewshot": 2.0}
MAIN_JOB_EVALS = ("vqa", "captions", "grounding", "fewshot")
# The text the main job's LM is pretrained on: the text side of the training tasks (images unused) and the
# text-only recall episodes, with their weights.
LM_MIXTURE = {"recall": 6.0, "captions": 1.0, "vqa": 1.0, "grounding": 0.5, "interleaved": 0.5, "fewshot": 1.0}
VISION_STEPS = 500  # of the main job's contrastive pretraining of the vision encoder
LM_STEPS = 600  # of the main job's LM pretraining


def builtin_main_job(arg):
    """The README's first command: the tiny Flamingo on the built-in dataset by the paper's recipe, then evaluated.

    Flamingo's recipe has three stages: a vision encoder pretrained contrastively on image-text pairs, an LM
    pretrained on text, then, with both frozen, the cross-attention (and resampler) trained on interleaved data.
    Nothing pretrained exists offline, so the first two are prerequisite runs of this config
    (`config.prerequisites`, resolved by the trainer when training starts, each once and cached;
    vlm_jax/prerequisites.py): `vision`, a SigLIP whose image tower is this Flamingo's ViT, on the built-in
    `objects` pairs (`pretrained_vision`), and `lm`, this Flamingo's LM on the text of the built-in tasks
    (`pretrained_lm`). Beside them: the built-in dataset (`builtin`, with its own tokenizer) and the real-image
    few-shot episodes (`digits`, `photos`). Then the Flamingo trains for 800 steps with the vision encoder and
    every LM weight frozen: the gated cross-attention blocks and the embedding rows of `<image>` and
    `<|endofchunk|>` (the new tokens) train. With the LM frozen the cross-attention is all that learns to read
    the images, so there is a block before every LM layer (4 heads of 16; every other layer with 2 heads, as
    the tiny variant, or with 4 heads read the images worse: docs/evaluation.md). The images are 64 px (the
    built-in scenes' size: at 32 px small shapes blur).
    Without a Perceiver resampler the gated cross-attention reads the ViT's 64 patch tokens (IDEFICS's
    option): at 64 patches a resampler saves nothing, and trained from scratch it first averages the patches,
    so the answers could not find objects (docs/evaluation.md). The ViT has a convolutional stem
    (`stem="conv"`, 16 channels): with the linear patchify a one-layer ViT hardly tells shapes apart in this
    budget (docs/systems.md). The LM layers are rematerialised (`remat="full"`): the saved attention
    probabilities cost more memory traffic than recomputing them. The whole command should take about 9-10
    minutes on a 2-core CPU with a fresh cache (an estimate from its timed parts: docs/evaluation.md). Evaluations run on held-out (colour, shape)
    combinations and on real-image few-shot episodes at the end, beside the model-free baselines
    (`eval_baselines`; docs/evaluation.md has the numbers).
    """
    from data_pipelines import real_images
    from data_pipelines.builtin import build

    scale = float(arg.scale)  # of the built-in dataset's record counts (and of the real-image episodes); tests use less
    root = "prerequisite:builtin"  # the built-in dataset's folder, once resolved
    c = get_config(f"variant=tiny,tokenizer={root}/{build.TOKENIZER}.model,data={root},train_new_tokens=True")
    c.total_steps, c.batch_size, c.log_every = 800, 16, 50
    c.checkpoint_every, c.eval_every, c.eval_examples = 400, 800, 200
    c.model.image_size = 64  # and so encoder_kwargs.image_size and data.image.size (one reference)
    c.model.encoder_kwargs.update(stem="conv", stem_width=16, pool="none")  # the LM reads the patch tokens
    c.model.lm.remat = "full"
    c.model.lm.cross_attn_every, c.model.lm.cross_attn.num_heads = 1, 4  # the LM is frozen: see the docstring
    c.model.resampler = None  # the LM attends to the 64 patch tokens: see the docstring
    c.data.seq_len, c.data.max_images = 128, 6  # and so data.interleaved's max_tokens and max_images
    c.data.image.method = "bilinear"
    c.data.worker_count = 1  # a Grain worker process prepares batches while the train step runs
    c.data.mixture = build.mixture(root, MAIN_JOB_MIXTURE)
    c.eval_tasks = {
        **{task: f"{root}/{task}/validation" for task in MAIN_JOB_EVALS},
        # few-shot episodes on real images shipped in scikit-learn and scikit-image (cached on first use)
        **{f"fewshot/{source}": f"prerequisite:{source}" for source in real_images.SOURCES},
    }
    c.eval_baselines = {task: f"{root}/{task}/train" for task in ("vqa", "captions")}  # the bars to clear
    # Few-shot accuracy per k moves by a few points: 200 built-in episodes per k (100 per k on real images).
    c.eval_examples_per_task = {"fewshot": 800, **{f"fewshot/{source}": 400 for source in real_images.SOURCES}}
    c.optim.update(lr=3e-3, schedule="cosine", warmup_steps=50, min_lr_ratio=0.05)
    episodes = max(4, round(real_images.DEFAULT_EPISODES * scale))
    c.prerequisites = ConfigDict(
        dict(
            builtin=dict(kind="builtin_data", seed=0, image_size=64, scale=scale),
            **{
                source: dict(kind="real_images", source=source, episodes=episodes, seed=0, image_size=64)
                for source in real_images.SOURCES
            },
            vision=dict(
                kind="run",
                workdir=f"{root}/siglip-objects",
                config=pretrained_vision(c, max(4, round(VISION_STEPS * scale))),
            ),
            lm=dict(kind="run", workdir=f"{root}/lm-text", config=pretrained_lm(c, max(4, round(LM_STEPS * scale)))),
        )
    )
    c.model.vision_checkpoint = "prerequisite:vision"
    c.model.lm_checkpoint = "prerequisite:lm"
    return c


def pretrained_vision(c: ConfigDict, steps: int) -> ConfigDict:
    """The config of the main job's `vision` prerequisite: a SigLIP (`configs/siglip.py:data=builtin`, sigmoid
    loss) whose image tower is the Flamingo's ViT (every key a reference to `c.model.encoder_kwargs`, but the
    pooling: a MAP head, which the Flamingo does not read) with a linear projection to the text tower's width,
    trained on the built-in `objects` pairs ("a red circle."): captions of whole scenes differ in so many words
    that a contrastive encoder learns colours but hardly shapes from them (docs/evaluation.md). It stands in for Flamingo's contrastively pretrained NFNet."""
    from data_pipelines.builtin import build

    root = "prerequisite:builtin"
    siglip = os.path.join(os.path.dirname(os.path.abspath(__file__)), "siglip.py")
    run = load_config(f"{siglip}:data=builtin")
    del run.prerequisites, run.eval_tasks  # the main job's prerequisites resolve `root`; no evaluation
    vision = c.model.encoder_kwargs
    run.model.vision = ConfigDict({**{key: vision.get_ref(key) for key in vision if key != "pool"}, "pool": "map"})
    run.data.image_size = vision.get_ref("image_size")
    run.model.projection = "clip"  # linear maps of both towers to `embed_dim` (the tower widths differ)
    run.model.text.max_len = 16  # an objects text is 4 ids + bos + eos
    run.data.train_path, run.data.validation_path = f"{root}/objects/train", f"{root}/objects/validation"
    run.data.tokenizer = f"{root}/{build.TOKENIZER}.model"
    run.total_steps, run.keep_checkpoints, run.eval_every, run.log_every = steps, 1, 0, 100
    run.checkpoint_every = run.get_ref("total_steps")
    return run


def pretrained_lm(c: ConfigDict, steps: int) -> ConfigDict:
    """The config of the main job's `lm` prerequisite: an `lm` run with the Flamingo LM's settings on the text of
    the built-in tasks (`LM_MIXTURE`: the text side of captions, VQA, grounding, documents and few-shot episodes,
    in the Flamingo template, images unused; and the text-only `recall` episodes). Every key it shares with
    `c.model.lm` (but the vocabulary, which both read from the tokenizer) and `data.seq_len` are references to
    `c`'s, so an override of the main job's LM reaches this run too (and, changing its config, its cache folder).

    It stands in for Flamingo's pretrained LM. The recall episodes ("This is a red dax. This is a blue wug. This
    is a red dax.") teach in-context recall: trained from scratch beside the images, the 4-layer LM copied any
    word of a few-shot episode (49-52% at k = 1, 2, 4) instead of the word that followed the query's colour."""
    from data_pipelines.builtin import build

    root = "prerequisite:builtin"
    lm_config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm.py")
    run = load_config(f"{lm_config}:data={root}/recall/train,tokenizer={root}/{build.TOKENIZER}.model")
    for key in run.model:
        if key in c.model.lm and key != "vocab_size":
            run.model[key] = c.model.lm.get_ref(key)
    run.data.seq_len = c.data.get_ref("seq_len")
    run.data.mixture = build.mixture(root, LM_MIXTURE)
    run.total_steps, run.keep_checkpoints, run.eval_every, run.log_every = steps, 1, 0, 100
    run.checkpoint_every = run.get_ref("total_steps")
    return run
