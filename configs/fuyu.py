"""Fuyu (Adept 2023): raw 30 x 30 image patches, one linear map, in the token stream of a Persimmon decoder.

Variants (`--config configs/fuyu.py:variant=NAME[,data=DIR,tokenizer=FILE.model]`;
`configs/fuyu.py:data=builtin[,scale=F]` trains the tiny model on the built-in dataset):
  tiny  8 px patches on a 32 px canvas (an image: up to 4 x 4 patches and a newline per row, 20 tokens), a 2-layer
        Persimmon-style LM
  8b    Fuyu-8B: 30 px patches (2700 values each) -> Persimmon-8B (36 layers, width 4096, 64 heads, squared-ReLU
        MLP 16384, partial rotary 0.5, query/key LayerNorm, RoPE theta 25000, vocabulary 262144, untied head),
        on a 1080 x 1080 canvas (an image: up to 36 x 36 patches and 36 newlines, 1332 tokens)

Sources of the 8b sizes: transformers' `FuyuConfig` (models/fuyu/configuration_fuyu.py: its text-config defaults
are adept/fuyu-8b's: vocab_size 262144, hidden_size 4096, intermediate_size 16384, num_hidden_layers 36,
num_attention_heads 64, hidden_act "relu2", layer_norm_eps 1e-5, qk_layernorm true, max_position_embeddings 16384,
`default_theta` 25000 and `partial_rotary_factor` 0.5; patch_size 30, num_channels 3, image_token_id 71011,
tie_word_embeddings false); `FuyuImageProcessor` (images scaled down to fit 1080 x 1920, padded with 1.0,
rescaled by 1/255 and normalised with mean 0.5 and std 0.5: to [-1, 1]). The `|NEWLINE|` id 71019 is, to our
knowledge, the adept/fuyu-8b tokenizer's (not checked offline; `vlm-jax convert-hf` reads the id from the
checkpoint's tokenizer.json, never from here).

Images (`data.image.mode` "fuyu", data_pipelines/pipeline.py::fuyu_canvas / fuyu_feature_order): as Fuyu's
processor, scaled down to fit the canvas keeping the aspect ratio (never up), padded with 1, and read as the
image's own ceil(h / patch) x ceil(w / patch) patches, a newline after each row (a variable grid per image).
What differs from Fuyu: the canvas is a square of `model.image_size` pixels (Fuyu-8B's processor fits images
into 1080 x 1920), so wide images are scaled smaller than Fuyu scales them. Fuyu's training recipe is not
published: the optimizer settings of `8b` are ours.

Data: the "fuyu" template (`|SPEAKER|` runs, `<s>{prompt}<0x04>{answer}</s>`, loss on the answer; see
data_pipelines/templates.py::fuyu). `model.image_tokens` (the canvas' patches: an image slot's features)
derives from `model.image_size` and `model.patch_size` (one source: `--config.model.image_size=64` changes the
canvas, the data's images and their placeholder counts together).
With `tokenizer=` the vocabulary size and the `|SPEAKER|` / `|NEWLINE|` ids are the tokenizer's, read when the
config is resolved (vlm_jax/prerequisites.py).
"""

from ml_collections import FieldReference

from vlm_jax.config_lib import ConfigDict, ConfigError, compute_dtype, module_defaults, parse_arg, training_config
from vlm_jax.lm.decoder import DecoderLM

# Persimmon-8B as Fuyu-8B's LM (transformers' FuyuConfig text-config defaults, see the module docstring).
PERSIMMON_8B = dict(
    vocab_size=262144, embed_dim=4096, num_layers=36, num_heads=64, num_kv_heads=64, mlp_dim=16384, rope_theta=25000.0
)
# Persimmon's block: LayerNorm with biases, biases on every projection, per-head query/key LayerNorm, RoPE on half
# of each head, squared-ReLU ("relu2") MLP with biases, an untied head (transformers' modeling_persimmon.py).
PERSIMMON_BLOCK = dict(
    norm="layernorm",
    norm_bias=True,
    norm_eps=1e-5,
    attn_bias=True,
    qk_norm=True,
    rope_fraction=0.5,
    mlp="plain",
    mlp_act="sqrelu",
    mlp_bias=True,
    tie_embeddings=False,
)
# The ids train_tokenizer gives `|SPEAKER|` and `|NEWLINE|` (data_pipelines/tokenizer.py SPECIAL_TOKENS from id 4);
# configs with a tokenizer read them from it.
TINY_IDS = (23, 24)
FUYU_8B_IDS = (71011, 71019)  # adept/fuyu-8b: FuyuConfig.image_token_id, the tokenizer's |NEWLINE|


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny", data="", tokenizer="", scale=1.0)
    if arg.variant not in ("tiny", "8b"):
        raise ConfigError(f"variant {arg.variant!r} is not one of tiny, 8b.")
    if arg.data == "builtin":
        if arg.variant != "tiny":
            raise ConfigError("data=builtin trains tiny; the 8b variant needs data=DIR,tokenizer=FILE.model.")
        return builtin(arg)
    tiny = arg.variant == "tiny"
    c = training_config(
        total_steps=60 if tiny else 10000,
        batch_size=8 if tiny else 256,
        mesh="data=-1,fsdp=1,tensor=1" if tiny else "data=-1,fsdp=8,tensor=1",
    )
    lm = dict(module_defaults(DecoderLM, exclude=("cross_attn_every",)), head_dim=0)  # 0 = embed_dim // heads
    lm.update(PERSIMMON_BLOCK)
    if tiny:
        image_size, patch, seq_len = FieldReference(32), FieldReference(8), FieldReference(64)
        lm.update(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=128)
        image_id, newline_id = TINY_IDS
    else:
        image_size, patch, seq_len = FieldReference(1080), FieldReference(30), FieldReference(2048)
        lm.update(PERSIMMON_8B)
        image_id, newline_id = FUYU_8B_IDS
    compute_dtype(lm, tiny=tiny)
    c.model = ConfigDict(
        dict(
            name="fuyu",
            patch_size=patch,
            image_size=image_size,
            lm=lm,
            # the canvas' patches: the features of an image slot (an image reads its own rows x cols of them)
            image_tokens=(image_size // patch) * (image_size // patch),
            image_token_id=image_id,  # "|SPEAKER|"
            newline_token_id=newline_id,  # "|NEWLINE|"
            lm_checkpoint="",  # an `lm` checkpoint (e.g. convert-hf of a Persimmon) for the LM
            stage_checkpoint="",  # an earlier fuyu run, or convert-hf of a Fuyu directory
        )
    )
    c.data = ConfigDict(
        dict(
            name="grain",
            source="array_record",
            train_path=arg.data,
            validation_path=arg.data,
            tokenizer=arg.tokenizer,
            template="fuyu",
            seq_len=seq_len,
            max_images=1,
            packing_bins=32,
            streams=0,  # data streams the records are dealt to; 0 = one per process (docs/data.md)
            shuffle=True,
            worker_count=0,
            interleaved=dict(max_tokens=seq_len, max_images=1),
            # FuyuImageProcessor: bilinear downscale to fit, pad with 1, to [-1, 1] (mean = std = 0.5: "siglip")
            image=dict(mode="fuyu", size=image_size, method="bilinear", normalization="siglip", max_aspect_ratio=20.0),
        )
    )
    if arg.tokenizer:
        c.from_tokenizer = (
            ("model.lm.vocab_size", "vocab_size"),
            ("model.image_token_id", "|SPEAKER|"),
            ("model.newline_token_id", "|NEWLINE|"),
        )
    c.optim = ConfigDict(
        dict(
            name="adamw",
            lr=3e-3 if tiny else 1e-4,  # Fuyu's recipe is not published: ours
            schedule="cosine",
            warmup_steps=5 if tiny else 500,
            min_lr_ratio=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            wd_exclude=(),
            clip_norm=1.0,
            freeze=(),  # every part trains (there is no vision encoder to keep frozen)
            lr_mults=(),
        )
    )
    return c


def builtin(arg):
    """The tiny Fuyu on the built-in dataset (`data_pipelines/builtin`, declared as a prerequisite and built when
    training starts): one stage, every part training, on captions, VQA and grounding conversations, with the VQA
    and caption evaluations on held-out combinations. The scenes' 64 px images in 8 px patches: 8 rows of 8
    patches and a newline, 72 image tokens."""
    from data_pipelines.builtin import build

    root = "prerequisite:builtin"
    c = get_config(f"variant=tiny,tokenizer={root}/{build.TOKENIZER}.model,data={root}")
    c.prerequisites = {"builtin": dict(kind="builtin_data", seed=0, image_size=64, scale=float(arg.scale))}
    steps = max(4, round(300 * float(arg.scale)))  # a scaled-down dataset (tests) trains a scaled-down run
    c.total_steps, c.batch_size, c.log_every = steps, 16, 50
    c.checkpoint_every, c.eval_every, c.eval_examples = steps, steps, 100
    c.model.image_size = 64
    # Two examples to a row (each ~100 tokens: 72 image tokens, the prompt, the answer): measured by `vlm-jax data
    # stats` on the built-in data (scale=0.02), 1.75 examples per row and 78% of the tokens filled.
    c.data.seq_len, c.data.max_images = 224, 2
    c.data.mixture, c.eval_tasks, c.eval_baselines = build.chat_tasks(root)
    c.optim.update(lr=2e-3, warmup_steps=20)
    return c
