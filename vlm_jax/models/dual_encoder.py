"""CLIP and SigLIP image-text dual encoders as a trainable system (`model.name = "dual_encoder"`).

Batch: `images` [B, H, W, 3] and `texts` [B, Lt] (see data_pipelines/pairs.py).
`model.loss` is "softmax" (CLIP: symmetric cross-entropy, learned
temperature) or "sigmoid" (SigLIP: t = exp(t'), t' = log 10, b = -10 at
init). With `model.chunked_loss` the sigmoid loss runs as a ring over the
data-parallel mesh axes and never builds the global B x B logits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import losses, sharding
from vlm_jax.encoders.text import TextTransformer
from vlm_jax.encoders.two_tower import TwoTower
from vlm_jax.encoders.vit import ViT
from vlm_jax.errors import ConfigError, UserError
from vlm_jax.models import parts, register
from vlm_jax.models.base import System
from vlm_jax.nn.layers import DenseGeneral

LOSSES = ("softmax", "sigmoid")


@register("dual_encoder")
class DualEncoder(System):
    """Image and text towers trained so that matching pairs score highest."""

    fusion = "dual_encoder"
    ignored_batch_keys = {"labels": "class labels are read on the host by the zero-shot evaluation, not by the model"}

    def __init__(self, config):
        super().__init__(config)
        m = config.model
        if m.loss not in LOSSES:
            raise ConfigError(f"model.loss {m.loss!r} is not one of {', '.join(LOSSES)}.")
        self.module = TwoTower(
            vision=m.vision.to_dict(),
            text=m.text.to_dict(),
            embed_dim=int(m.embed_dim),
            projection=m.projection,
            logit_scale_init=float(m.logit_scale_init),
            logit_bias_init=None if m.get("logit_bias_init") is None else float(m.logit_bias_init),
        )
        self.image_size = int(m.vision.image_size)
        self.text_len = int(m.text.max_len)

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return {
            "images": np.zeros((batch_size, self.image_size, self.image_size, 3), np.float32),
            "texts": np.ones((batch_size, self.text_len), np.int32),
        }

    def init(self, rng, batch):
        return self.module.init(rng, batch["images"], batch["texts"])["params"]

    def embed(self, params, batch) -> dict[str, jax.Array]:
        """image_embeds, text_embeds (L2-normalised), logit_scale, logit_bias."""
        return self.module.apply({"params": params}, batch["images"], batch["texts"])

    def loss(self, params, batch):
        out = self.embed(params, batch)
        img, txt, scale = out["image_embeds"], out["text_embeds"], out["logit_scale"]
        if self.config.model.loss == "softmax":
            loss = losses.softmax_contrastive(img, txt, scale)
        else:
            active = sharding.active()
            if self.config.model.get("chunked_loss", True) and active is not None:
                mesh, rules = active
                axes = sharding.batch_axes(mesh, rules)
                loss = losses.chunked_sigmoid_loss(img, txt, scale, out["logit_bias"], mesh, axes)
            else:
                loss = losses.sigmoid_loss(img, txt, scale, out["logit_bias"])
        # In-batch image->text top-1 accuracy; O(B * dim) memory via the argmax of each row.
        best = jnp.argmax(img @ txt.T, axis=1)
        accuracy = jnp.mean((best == jnp.arange(img.shape[0])).astype(jnp.float32))
        metrics = {"accuracy": accuracy, "temperature": scale}
        if out["logit_bias"] is not None:
            metrics["bias"] = out["logit_bias"]
        return loss, jnp.ones((), jnp.float32), metrics

    def flops_per_example(self) -> float:
        """Training FLOPs per image-text pair from each tower's forward matmul FLOPs (`vlm_jax.flops`; the B x B
        logits of the loss are left out), following `optim.freeze` (`parts.training_flops`): each tower is its
        encoder, then its projection (projection="clip"); a trained part costs 3x its forward, a frozen
        projection over a trained encoder 2x, a frozen encoder 1x (nothing trains below it): LiT's locked image
        tower (`image_encoder/.*`, `visual_projection/.*`) costs its forward only."""
        m, trains = self.module, parts.trained(self)
        images = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3), jnp.float32)
        ids = jax.ShapeDtypeStruct((1, self.text_len), jnp.int32)
        towers = (
            (ViT(**dict(m.vision)), images, "image_encoder", "visual_projection"),
            (TextTransformer(**dict(m.text)), ids, "text_encoder", "text_projection"),
        )
        total = 0.0
        for tower, inputs, name, projection in towers:
            chain = [(parts.forward_flops(tower, inputs), trains(name))]
            if m.projection == "clip":
                pooled = parts.output_shape(tower, inputs)["pooled"]
                proj = DenseGeneral(m.embed_dim, ("embed", None))
                chain.append((parts.forward_flops(proj, pooled), trains(projection)))
            total += parts.training_flops(chain)
        return total

    def tokens_in(self, batch):
        return int(np.count_nonzero(batch["texts"]))

    def forward(self, params, inputs):
        """transformers-style inputs (pixel_values NCHW, input_ids[, attention_mask]) -> embeddings and logits."""
        missing = [k for k in ("pixel_values", "input_ids") if k not in inputs]
        if missing:
            raise UserError(
                f"the inputs have no {', '.join(missing)} (found: {', '.join(sorted(inputs)) or 'nothing'})."
            )
        pixels = np.asarray(inputs["pixel_values"], np.float32)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise UserError(f"pixel_values must be [batch, 3, height, width]; got shape {pixels.shape}.")
        ids = np.asarray(inputs["input_ids"], np.int32)
        mask = inputs.get("attention_mask")

        def run(params, images, ids, mask):
            return self.module.apply({"params": params}, images, ids, mask)

        out = jax.jit(run)(params, pixels.transpose(0, 2, 3, 1), ids, None if mask is None else np.asarray(mask))
        logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
        if out["logit_bias"] is not None:
            logits = logits + out["logit_bias"]
        return {
            "image_embeds": np.asarray(out["image_embeds"]),
            "text_embeds": np.asarray(out["text_embeds"]),
            "logits_per_image": np.asarray(logits),
            "logits_per_text": np.asarray(logits).T,
        }

    def evaluate(self, trainer, params) -> dict[str, float]:
        """The tasks of `config.eval_tasks` if any, else retrieval and zero-shot on validation batches.

        `config.eval_tasks = {task: source}` runs `evaluators/dual_encoder_tasks.py` (retrieval on a pairs
        folder, zero-shot on the built-in data, few-shot digits from scikit-learn, scikit-image photos); its
        samples stay in `self.eval_samples` for the run report. Without it: retrieval recall@1/5/10 on
        `config.eval_examples` validation pairs of the pipeline, and with `config.zero_shot = dict(classes=[...],
        prompts=["a photo of a {}.", ...])` zero-shot accuracy of the same images by their `labels` with CLIP's
        prompt ensemble.
        """
        from data_pipelines import build as build_data
        from vlm_jax.evaluators.contrastive import class_embeddings, retrieval_recall, zero_shot_accuracy

        config = trainer.config
        tasks = dict(config.get("eval_tasks") or {})
        if tasks:
            from vlm_jax.evaluators import dual_encoder_tasks

            embedder = dual_encoder_tasks.Embedder(self, params, config, mesh=trainer.mesh, rules=trainer.rules)
            options = {k: dict(v) for k, v in dict(config.get("eval_options") or {}).items()}
            limit = int(config.get("eval_examples", 256))
            metrics, self.eval_samples = dual_encoder_tasks.evaluate(embedder, tasks, limit, options)
            return metrics
        data = build_data(config, "validation", jax.process_index(), jax.process_count())
        steps = max(1, math.ceil(int(config.get("eval_examples", 256)) / config.batch_size))
        embed = jax.jit(lambda p, b: self.embed(p, b))
        images, texts, labels = [], [], []
        for _ in range(steps):
            host = next(data)
            out = jax.device_get(embed(params, trainer.put_batch(host)))
            images.append(out["image_embeds"])
            texts.append(out["text_embeds"])
            labels.append(host.get("labels", np.full(len(host["texts"]), -1)))
        images, texts, labels = np.concatenate(images), np.concatenate(texts), np.concatenate(labels)
        metrics = retrieval_recall(images, texts, np.arange(len(texts)))
        zero_shot = config.get("zero_shot")
        if zero_shot and (labels >= 0).any():
            prompts = [[p.format(c) for p in zero_shot.prompts] for c in zero_shot.classes]
            ids = np.stack([data.encode_text(p) for row in prompts for p in row])
            embed_texts = jax.jit(lambda p, t: self.module.apply({"params": p}, t, method=TwoTower.embed_texts))
            prompt_embeds = np.asarray(embed_texts(params, ids)).reshape(len(prompts), len(prompts[0]), -1)
            keep = labels >= 0
            accuracy = zero_shot_accuracy(images[keep], class_embeddings(prompt_embeds), labels[keep], ks=(1,))
            metrics["zero_shot_top1"] = accuracy["top1"]
        return metrics
