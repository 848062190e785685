"""Contrastive losses against direct formulas; the chunked SigLIP loss equals the dense one, gradients too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import losses, sharding


def embeddings(batch, dim=12, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    img = jax.random.normal(k1, (batch, dim))
    txt = img + 0.5 * jax.random.normal(k2, (batch, dim))  # matching pairs are closer
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return norm(img), norm(txt)


def test_softmax_and_sigmoid_match_explicit_sums():
    img32, txt32 = embeddings(5)
    img, txt = np.asarray(img32, np.float64), np.asarray(txt32, np.float64)
    logits = 3.0 * img @ txt.T
    log_softmax_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    log_softmax_cols = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    want = -(np.trace(log_softmax_rows) + np.trace(log_softmax_cols)) / (2 * 5)
    assert float(losses.softmax_contrastive(img32, txt32, 3.0)) == pytest.approx(want, rel=1e-5)
    z = 10.0 * img @ txt.T - 10.0
    want = (
        sum(np.log1p(np.exp(-z[i, j])) if i == j else np.log1p(np.exp(z[i, j])) for i in range(5) for j in range(5)) / 5
    )
    assert float(losses.sigmoid_loss(img32, txt32, 10.0, -10.0)) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("mesh_spec, axes", [("data=8", ("data",)), ("data=2,fsdp=2,tensor=2", ("data", "fsdp"))])
def test_chunked_sigmoid_equals_dense_loss_and_gradients(mesh_spec, axes):
    mesh = sharding.make_mesh(mesh_spec)
    img, txt = embeddings(16, seed=1)
    params = (img, txt, jnp.asarray(10.0), jnp.asarray(-10.0))

    def dense(img, txt, t, b):
        return losses.sigmoid_loss(img, txt, t, b)

    def chunked(img, txt, t, b):
        return losses.chunked_sigmoid_loss(img, txt, t, b, mesh, axes)

    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))
    sharded = (jax.device_put(img, spec), jax.device_put(txt, spec), params[2], params[3])
    want, want_grads = jax.jit(jax.value_and_grad(dense, argnums=(0, 1, 2, 3)))(*params)
    got, got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3)))(*sharded)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


def test_chunked_loss_never_builds_the_global_logits():
    mesh = sharding.make_mesh("data=8")
    img, txt = embeddings(64, seed=2)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    fn = jax.jit(lambda a, b: losses.chunked_sigmoid_loss(a, b, 10.0, -10.0, mesh, ("data",)))
    hlo = fn.lower(jax.device_put(img, spec), jax.device_put(txt, spec)).compile().as_text()
    assert "f32[64,64]" not in hlo and "f32[8,8]" in hlo
