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
"""

from vlm_jax import sharding
from vlm_jax.config_lib import ConfigDict, ConfigError, parse_arg

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
    c.eval_every = 0
    c.eval_steps = 2
    c.peak_tflops = 0.0

    vocab = int(arg.vocab)
    if arg.tokenizer:
        from data_pipelines.tokenizer import Tokenizer

        tokenizer = Tokenizer(arg.tokenizer)
        vocab, media_token_id = tokenizer.vocab_size, tokenizer.token_id("<image>")
        new_tokens = (media_token_id, tokenizer.token_id("<|endofchunk|>"))
    else:
        if arg.train_new_tokens:
            raise ConfigError(
                "train_new_tokens needs tokenizer=FILE.model (it names the <image> and <|endofchunk|> ids)."
            )
        media_token_id = 3  # placeholder id for configs built without a tokenizer (parameter counts, tests)

    if arg.variant == "tiny":
        image_size, seq_len = 32, 64
        encoder = "vit"
        encoder_kwargs = dict(
            variant="", width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, image_size=image_size,
            pre_norm=True, norm_eps=1e-5, mlp_act="quick_gelu",
        )  # fmt: skip
        resampler = dict(depth=1, num_heads=2, head_dim=16, num_latents=4)
        lm = dict(
            vocab_size=vocab, embed_dim=64, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=128,
            cross_attn_every=2, cross_attn=dict(num_heads=2, head_dim=16),
        )  # fmt: skip
    else:
        width, layers, heads, every = LMS[arg.variant]
        image_size, seq_len = 320, 2048  # Flamingo pretrains NFNet-F6 at 288/320 px
        encoder = "nfnet"
        encoder_kwargs = dict(variant="F6", num_classes=0)
        resampler = dict(depth=6, num_heads=16, head_dim=128, num_latents=64, ff_act="sqrelu", width=1536)
        lm = dict(
            vocab_size=32000, embed_dim=width, num_layers=layers, num_heads=heads, num_kv_heads=heads,
            mlp_dim=4 * width, mlp="plain", mlp_act="gelu", position_embedding="relative", tie_embeddings=True,
            cross_attn_every=every, cross_attn=dict(num_heads=heads, head_dim=128, ff_act="sqrelu"),
        )  # fmt: skip
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
            max_images=4 if arg.variant == "tiny" else 5,
            packing_bins=32,
            shuffle=True,
            worker_count=0,
            interleaved=dict(max_tokens=seq_len, max_images=4 if arg.variant == "tiny" else 5),
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
            freeze=FROZEN,
            lr_mults=(),
        )
    )
    if arg.train_new_tokens:  # the embedding trains, but only the rows of <image> and <|endofchunk|>
        c.optim.freeze = tuple(p for p in FROZEN if p != "decoder/embed/.*")
        c.optim.trainable_rows = (("decoder/embed/embedding", new_tokens),)
    return c


# The built-in dataset's tasks in the main job's training mixture, with their weights.
MAIN_JOB_MIXTURE = {"captions": 2.0, "vqa": 3.0, "grounding": 0.5, "interleaved": 0.5, "fewshot": 2.0}
MAIN_JOB_EVALS = ("vqa", "captions", "grounding", "fewshot")


def builtin_main_job(arg):
    """The README's first command: the tiny Flamingo trained from scratch on the built-in dataset, then evaluated.

    `data_pipelines/builtin` is built (about 25 s) and cached on first use with its own tokenizer. Nothing
    pretrained exists offline, so the LM is first pretrained on the built-in text episodes (`pretrained_lm`,
    cached too), and then the vision encoder and the LM train with the cross-attention (the paper's frozen
    recipe needs a real `lm_checkpoint` / `vision_checkpoint`). The images are 64 px (the built-in scenes' size: at 32 px small
    shapes blur). Without a Perceiver resampler the gated cross-attention reads the ViT's 64 patch tokens
    (IDEFICS's option): at 64 patches a resampler saves nothing, and trained from scratch it first averages
    the patches, so the answers could not find objects (measured at 1000 steps: CIDEr 0.86-1.08 with 16
    latents, 1.35 without; colour questions 18% -> 29%). The ViT has a convolutional stem
    (`stem="conv"`, 16 channels): with the linear patchify a one-layer ViT hardly tells shapes apart in this
    budget (docs/systems.md). The LM layers are rematerialised (`remat="full"`), which is faster here: the
    saved attention probabilities cost more memory traffic than recomputing them (0.40 vs 0.45 s/step).
    Evaluations run on held-out (colour, shape) combinations and on real-image few-shot episodes at the
    end, beside the model-free baselines (`eval_baselines`; docs/evaluation.md has the numbers).
    """
    from data_pipelines import real_images
    from data_pipelines.builtin import build

    scale = float(arg.scale)  # of the built-in dataset's record counts (and of the real-image episodes); tests use less
    root = build.ensure(scale=scale)
    tokenizer = f"{root}/{build.TOKENIZER}.model"
    c = get_config(f"variant=tiny,tokenizer={tokenizer},data={root}")
    c.total_steps, c.batch_size, c.log_every = 1000, 16, 50
    c.checkpoint_every, c.eval_every, c.eval_examples = 500, 1000, 200
    c.model.image_size = c.model.encoder_kwargs.image_size = c.data.image.size = 64
    c.model.encoder_kwargs.update(stem="conv", stem_width=16)
    c.model.lm.remat = "full"
    c.model.resampler = None  # the LM attends to the 64 patch tokens: see the docstring
    c.data.seq_len = c.data.interleaved.max_tokens = 128
    c.data.max_images = c.data.interleaved.max_images = 6
    c.data.image.method = "bilinear"
    c.data.worker_count = 1  # a Grain worker process prepares batches while the train step runs
    c.data.mixture = [
        dict(train_path=f"{root}/{task}/train", validation_path=f"{root}/{task}/validation", weight=weight)
        for task, weight in MAIN_JOB_MIXTURE.items()
    ]
    c.eval_tasks = {
        **{task: f"{root}/{task}/validation" for task in MAIN_JOB_EVALS},
        # few-shot episodes on real images shipped in scikit-learn and scikit-image (cached on first use)
        **{
            f"fewshot/{source}": real_images.ensure(
                source, episodes=max(4, round(real_images.DEFAULT_EPISODES * scale))
            )
            for source in real_images.SOURCES
        },
    }
    c.eval_baselines = {task: f"{root}/{task}/train" for task in ("vqa", "captions")}  # the bars to clear
    # Few-shot accuracy per k moves by a few points: 200 built-in episodes per k (100 per k on real images).
    c.eval_examples_per_task = {"fewshot": 800, **{f"fewshot/{source}": 400 for source in real_images.SOURCES}}
    c.optim.update(lr=2e-3, schedule="cosine", warmup_steps=50, min_lr_ratio=0.05, freeze=())
    c.model.lm_checkpoint = pretrained_lm(root, c.model.lm, c.data.seq_len, steps=max(4, round(LM_STEPS * scale)))
    return c


LM_STEPS = 600  # of the main job's LM pretraining on the built-in text episodes


def pretrained_lm(root: str, lm, seq_len: int, steps: int) -> str:
    """The workdir of an `lm` run with the Flamingo LM's shapes on the built-in `recall` text episodes, trained
    on the first call only (about 75 s at 600 steps) and kept in the dataset's cache folder.

    It stands in for Flamingo's pretrained LM: trained from scratch beside the images, the 4-layer LM copies any
    word of a few-shot episode (49-52% at k = 1, 2, 4 on 200 episodes each) instead of the word that followed the
    query's colour; 600 steps of 16 rows of text episodes first teach that recall (95% on held-out text
    episodes), and the few-shot accuracy of the main job then rises with k (docs/evaluation.md)."""
    import hashlib
    import os

    from data_pipelines.builtin import build
    from vlm_jax.config_lib import load_config
    from vlm_jax.train import trainer

    lm_config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm.py")
    c = load_config(f"{lm_config}:data={root}/recall/train,tokenizer={root}/{build.TOKENIZER}.model")
    c.model.update({k: v for k, v in lm.items() if k in c.model and k != "vocab_size"})
    c.data.seq_len = c.data.interleaved.max_tokens = seq_len
    c.data.validation_path = f"{root}/recall/validation"
    c.total_steps, c.checkpoint_every, c.keep_checkpoints, c.eval_every, c.log_every = steps, steps, 1, 0, 100
    key = hashlib.sha1(c.to_json(sort_keys=True).encode()).hexdigest()[:10]

    def train(workdir: str) -> None:
        print(f"Pretraining the LM on the built-in text episodes: {steps} steps, once (cached).", flush=True)
        trainer.train(c, workdir)

    return build.cached(f"{root}/lm-recall-{key}", "config.json", train)
