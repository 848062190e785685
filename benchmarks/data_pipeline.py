"""Throughput and packing efficiency of the Grain pipeline.

    python benchmarks/data_pipeline.py [--records 4000] [--rows 400] [--seq_len 512] [--image_size 64]

Data: captions whose rendered length is 5-120 tokens (uniform), each with one
64x64 PNG image (encoded, so decoding and resizing are part of the measured
work), in an in-memory source; a word-level SentencePiece model trained on the
fly; template "flamingo"; one image slot = 1 placeholder token.

Reports (last line JSON):
* token fill of packed rows (non-pad fraction) against plain padding of the
  same examples, one per row;
* pipeline rows/s (single process, no Grain workers) against the rows/s the
  tiny training config consumes (`configs/lm.py:variant=tiny` at the same row
  length and batch size, measured with `benchmarks/train_step.py`'s method).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from data_pipelines.pipeline import GrainPipeline
from data_pipelines.templates import render
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from vlm_jax.config_lib import ConfigDict, load_config

# Letter-only words, so that each is one SentencePiece token (digits would be split).
WORDS = ["".join(chr(97 + (i // 26**k) % 26) for k in range(3)) for i in range(300)]


def make_records(n: int, image_size: int, tokenizer: Tokenizer, seed: int = 0) -> list[dict]:
    """Captions whose rendered example (flamingo template, shifted) is 5..120 tokens long, uniformly."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        record = {"images": [buffer.getvalue()], "caption": ""}
        target, words = int(rng.integers(5, 121)), []
        while len(words) < 200:
            words.append(str(rng.choice(WORDS)))
            record["caption"] = " ".join(words)
            if len(render("flamingo", tokenizer, record, 1).ids) - 1 >= target:
                break
        records.append(record)
    return records


def pipeline_config(tokenizer: str, records: list[dict], seq_len: int, batch_size: int) -> ConfigDict:
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "lm.py:variant=tiny"))
    config.batch_size = batch_size
    config.model.image_tokens = 1
    config.data = ConfigDict(
        dict(
            name="grain",
            source="memory",
            format="pairs",
            records={"train": records},
            tokenizer=tokenizer,
            template="flamingo",
            seq_len=seq_len,
            max_images=32,
            packing_bins=32,
            image=dict(mode="fixed", size=32, method="bicubic", normalization="clip", max_aspect_ratio=20.0),
        )
    )
    return config


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=64)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "words.txt")
        rng = np.random.default_rng(0)
        with open(text, "w") as f:
            for _ in range(2000):
                f.write(" ".join(rng.choice(WORDS, size=12)) + "\n")
        tokenizer = train_tokenizer([text], os.path.join(tmp, "spm"), vocab_size=400)
        records = make_records(args.records, args.image_size, Tokenizer(tokenizer))
        config = pipeline_config(tokenizer, records, args.seq_len, args.batch_size)

        pipeline = GrainPipeline(config, "train")
        rows = iter(pipeline.rows)
        next(rows)  # warm-up
        start = time.perf_counter()
        filled = examples = lengths = 0
        for _ in range(args.rows):
            row = next(rows)
            filled += int(np.count_nonzero(row["segment_ids"]))
            examples += int(row["segment_ids"].max())
        seconds = time.perf_counter() - start
        packed_fill = filled / (args.rows * args.seq_len)
        lengths = filled / examples
        padded_fill = lengths / args.seq_len  # one example per row

        trainer_rows_per_s = measure_trainer(config, args.seq_len, args.batch_size)
    result = {
        "rows": args.rows,
        "seq_len": args.seq_len,
        "mean_example_tokens": round(lengths, 1),
        "examples_per_row": round(examples / args.rows, 2),
        "token_fill_packed": round(packed_fill, 4),
        "token_fill_padded": round(padded_fill, 4),
        "pipeline_rows_per_s": round(args.rows / seconds, 1),
        "trainer_rows_per_s_tiny_lm": round(trainer_rows_per_s, 1),
        "pipeline_over_trainer": round(args.rows / seconds / trainer_rows_per_s, 2),
        "skipped": pipeline.stats(),
    }
    for k, v in result.items():
        print(f"{k:>28}: {v}")
    print(json.dumps(result))
    return result


def measure_trainer(config: ConfigDict, seq_len: int, batch_size: int) -> float:
    """Rows/s the tiny LM train step consumes at this row length (device-resident batch, as benchmarks/train_step.py)."""
    import jax

    from vlm_jax.train.trainer import Trainer

    lm = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "lm.py:variant=tiny"))
    lm.data.seq_len = seq_len
    lm.batch_size = batch_size
    trainer = Trainer(lm)
    state = trainer.init(jax.random.key(0))
    batch = trainer.put_batch(trainer.system.dummy_batch(batch_size))
    step = trainer.train_step.lower(state, batch).compile()
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start, steps = time.perf_counter(), 10
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return steps * batch_size / (time.perf_counter() - start)


if __name__ == "__main__":
    main(sys.argv[1:])
