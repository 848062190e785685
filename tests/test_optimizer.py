"""The optax factory: schedules against closed forms, decay masks, lr multipliers, freezing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from vlm_jax.train import optimizer as opt


def optim(**kw):
    base = dict(name="adamw", lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0)
    base.update(kw)
    return ConfigDict(base)


def test_warmup_then_cosine_matches_closed_form():
    schedule = opt.make_schedule(optim(), total_steps=110)
    for step in (0, 5, 10, 35, 60, 110):
        if step < 10:
            want = step / 10
        else:
            frac = (step - 10) / 100
            want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5), step


def test_linear_and_rsqrt_and_constant():
    linear = opt.make_schedule(optim(schedule="linear", warmup_steps=0), total_steps=100)
    assert float(linear(50)) == pytest.approx(1.0 - 0.9 * 0.5, rel=1e-5)
    rsqrt = opt.make_schedule(optim(schedule="rsqrt", warmup_steps=0, rsqrt_timescale=100.0), total_steps=1000)
    assert float(rsqrt(300)) == pytest.approx(1 / math.sqrt(4.0), rel=1e-5)
    assert float(opt.make_schedule(optim(schedule="constant", warmup_steps=0), 10)(7)) == 1.0
    with pytest.raises(ValueError, match="not one of"):
        opt.make_schedule(optim(schedule="cubic"), 10)


NAMES = {
    "layers": {"kernel": ("layers", "embed", "mlp"), "scale": ("layers", "embed")},
    "embed": {"embedding": ("vocab", "embed")},
}


def params_like(names, value=1.0):
    shapes = {("layers", "embed", "mlp"): (2, 3, 4), ("layers", "embed"): (2, 3), ("vocab", "embed"): (5, 3)}
    return jax.tree.map(lambda n: jnp.full(shapes[n], value), names, is_leaf=lambda x: isinstance(x, tuple))


def test_decay_mask_skips_vectors_even_when_scanned():
    mask = opt.decay_mask(NAMES, optim(wd_exclude=["embed/.*"]))
    assert mask == {"layers": {"kernel": True, "scale": False}, "embed": {"embedding": False}}


def test_sgd_weight_decay_and_lr_multipliers_scale_updates():
    config = optim(
        name="sgd", schedule="constant", warmup_steps=0, lr=0.1, weight_decay=0.5, lr_mults=[["layers/kernel", 0.25]]
    )
    tx, _ = opt.make_optimizer(config, 10, NAMES)
    params = params_like(NAMES, 2.0)
    grads = params_like(NAMES, 1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    # SGD: -lr * (g + wd * p) where decayed, times the multiplier.
    np.testing.assert_allclose(updates["layers"]["kernel"], -0.1 * (1 + 0.5 * 2) * 0.25)
    np.testing.assert_allclose(updates["layers"]["scale"], -0.1 * 1.0)
    np.testing.assert_allclose(updates["embed"]["embedding"], -0.1 * (1 + 0.5 * 2))


# sum(x^2) from x = 1 in all 45 entries: the gradient 2x clipped to global norm 1 is g = 1/sqrt(45) per entry
# (while x > 1/(2 sqrt 45) = 0.075). Five steps at lr 0.05 leave every entry at:
#   sgd: x - 0.05 g per step -> 1 - 0.25/sqrt(45);
#   adamw: m_hat / sqrt(v_hat) = g / g = 1 for a constant gradient -> 1 - 5 x 0.05 = 0.75;
#   adafactor (unfactored below 128 rows, its first decay 0): g / sqrt(g^2) = 1, times lr and the entry's RMS x
#   -> x <- 0.95 x, 0.95^5.
QUADRATIC_STEPS = {"sgd": 1 - 0.25 / math.sqrt(45), "adamw": 0.75, "adafactor": 0.95**5}


@pytest.mark.parametrize("name", sorted(QUADRATIC_STEPS))
def test_every_optimizer_takes_its_hand_computed_steps_on_a_quadratic(name):
    tx, _ = opt.make_optimizer(optim(name=name, lr=0.05, warmup_steps=0, schedule="constant", clip_norm=1.0), 10, NAMES)
    params = params_like(NAMES, 1.0)
    state = tx.init(params)
    loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))  # noqa: E731
    for _ in range(5):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = jax.tree.map(jnp.add, params, updates)
    for leaf in jax.tree.leaves(params):
        np.testing.assert_allclose(leaf, QUADRATIC_STEPS[name], rtol=1e-5)


def test_global_norm_clipping_and_agc():
    big = {"w": jnp.full((4, 4), 10.0)}
    names = {"w": ("embed", "mlp")}
    tx, _ = opt.make_optimizer(optim(name="sgd", lr=1.0, warmup_steps=0, schedule="constant", clip_norm=2.0), 10, names)
    updates, _ = tx.update(big, tx.init(big), big)
    assert float(opt.global_norm(updates)) == pytest.approx(2.0, rel=1e-5)
    tx, _ = opt.make_optimizer(optim(name="sgd", lr=1.0, warmup_steps=0, schedule="constant", agc_clip=0.01), 10, names)
    params = {"w": jnp.ones((4, 4))}
    updates, _ = tx.update(big, tx.init(params), params)
    # AGC bounds each unit's gradient norm by clip * the unit's parameter norm (here 0.01 * 2).
    assert float(jnp.max(jnp.linalg.norm(updates["w"], axis=0))) == pytest.approx(0.02, rel=1e-3)


def test_split_and_merge_by_freeze_regex():
    params = params_like(NAMES)
    trainable, frozen = opt.split_trainable(params, ["embed/.*"])
    assert set(trainable) == {"layers"} and set(frozen) == {"embed"}
    merged = opt.merge(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
