"""A decoder-only language model on the synthetic token stream: proves the training loop.

Variants (`--config configs/lm.py:variant=NAME`):
  tiny  ~0.1M params, seconds per run on a laptop CPU (the test and quick-start config)
  50m   ~50M params (benchmarks)
  1b    ~1.1B params, LLaMA-style shapes, for pods

`data=DIR,tokenizer=FILE.model[,template=NAME]` trains the same LM on the text
side of a `vlm-jax data build` folder through the Grain pipeline (packed rows;
the images are decoded and packed but the LM does not use them); its
`model.vocab_size` is the tokenizer's, read when the config is resolved
(`from_tokenizer`, vlm_jax/prerequisites.py), so loading the config reads no
file. Every `DecoderLM` setting is a `model` key (`--config.model.remat=full`),
at the module's default unless set here; `data.interleaved.max_tokens` follows
`data.seq_len`.
"""

from ml_collections import FieldReference

from vlm_jax import sharding
from vlm_jax.config_lib import ConfigDict, ConfigError, module_defaults, parse_arg
from vlm_jax.lm.decoder import DecoderLM

VARIANTS = {
    #       vocab, embed, layers, heads, kv_heads, mlp, seq_len, batch, steps
    "tiny": (256, 64, 2, 4, 2, 128, 64, 16, 200),
    "50m": (32000, 512, 8, 8, 4, 1536, 512, 32, 1000),
    "1b": (32000, 2048, 16, 16, 8, 5632, 2048, 256, 100_000),
}


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny", data="synthetic", tokenizer="", template="flamingo")
    if arg.variant not in VARIANTS:
        raise ConfigError(f"variant {arg.variant!r} is not one of {sorted(VARIANTS)}.")
    vocab, embed, layers, heads, kv_heads, mlp, seq_len, batch, steps = VARIANTS[arg.variant]

    c = ConfigDict()
    c.seed = 0
    c.total_steps = steps
    c.batch_size = batch
    c.grad_accum_steps = 1
    c.mesh = "data=-1,fsdp=1,tensor=1"
    c.logical_axis_rules = sharding.DEFAULT_RULES
    c.log_every = 20
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.max_consecutive_nonfinite = 10  # skipped non-finite updates in a row that stop the run; 0 = never
    c.schedule_steps = 0  # the learning-rate schedule's length; 0 = total_steps
    c.eval_every = 100
    c.eval_steps = 4
    c.peak_tflops = 0.0  # per device; 0 = spec-sheet table, else measured

    c.model = ConfigDict(
        dict(
            module_defaults(DecoderLM, exclude=("cross_attn_every",)),  # remat: none | full | dots | dots_no_batch
            name="lm",
            vocab_size=vocab,
            embed_dim=embed,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            mlp_dim=mlp,
            head_dim=0,  # 0 = embed_dim // num_heads
        )
    )
    c.data = ConfigDict(dict(name="synthetic_lm", seq_len=seq_len, min_doc_len=8))
    if arg.data != "synthetic":
        c.data = grain_data(arg, FieldReference(seq_len))
        c.model.vocab_size = 0  # the tokenizer's, when the config is resolved
        c.from_tokenizer = (("model.vocab_size", "vocab_size"),)
        c.model.image_tokens = 1
    c.optim = ConfigDict(
        dict(
            name="adamw",
            lr=3e-3 if arg.variant == "tiny" else 3e-4,
            schedule="cosine",
            warmup_steps=max(steps // 20, 1),
            min_lr_ratio=0.1,
            rsqrt_timescale=10_000.0,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            momentum=0.9,
            nesterov=False,
            weight_decay=0.1,
            wd_exclude=(),
            clip_norm=1.0,
            agc_clip=0.0,
            freeze=(),
            lr_mults=(),  # ((regex, multiplier), ...)
        )
    )
    return c


def grain_data(arg, seq_len):
    """The Grain pipeline over a `data build` folder (train and validation read the same folder)."""
    if not arg.tokenizer:
        raise ConfigError("data=DIR needs tokenizer=FILE.model (see `vlm-jax data train-tokenizer`).")
    return ConfigDict(
        dict(
            name="grain",
            source="array_record",
            train_path=arg.data,
            validation_path=arg.data,
            tokenizer=arg.tokenizer,
            template=arg.template,
            seq_len=seq_len,
            max_images=8,
            packing_bins=32,
            streams=0,  # data streams the records are dealt to; 0 = one per process (docs/data.md)
            shuffle=True,
            worker_count=0,
            interleaved=dict(max_tokens=seq_len, max_images=5),
            image=dict(mode="fixed", size=32, method="bicubic", normalization="clip", max_aspect_ratio=20.0),
        )
    )
