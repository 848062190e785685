"""In-sequence placement of image features: each example's placeholders take its own images' features, in order."""

import jax
import numpy as np

from vlm_jax.nn.placement import place_features


def reference(features, placeholders, segment_ids, image_segment_ids, valid):
    """A plain loop: per row and example, zip its placeholders with its slots' valid features."""
    b, m, n, d = features.shape
    values = np.zeros(placeholders.shape + (d,), np.float32)
    placed = np.zeros(placeholders.shape, bool)
    for r in range(b):
        for s in set(segment_ids[r].tolist()) - {0}:
            feats = [
                features[r, j, i] for j in range(m) if image_segment_ids[r, j] == s for i in range(n) if valid[r, j, i]
            ]
            spots = [t for t in range(placeholders.shape[1]) if placeholders[r, t] and segment_ids[r, t] == s]
            for t, f in zip(spots, feats):
                values[r, t], placed[r, t] = f, True
    return values, placed


def packed_case(rng, rows=3, length=40, slots=5, n=3, d=4):
    """Random packed rows: examples of random lengths, each with 0-2 images of n placeholders (some examples short
    of features, some slots with invalid features)."""
    segment_ids = np.zeros((rows, length), np.int32)
    placeholders = np.zeros((rows, length), bool)
    image_segment_ids = np.zeros((rows, slots), np.int32)
    for r in range(rows):
        t, slot, s = 0, 0, 1
        while t < length - 4:
            size = int(rng.integers(4, 14))
            end = min(t + size, length - int(rng.integers(0, 3)))
            segment_ids[r, t:end] = s
            images = int(rng.integers(0, 3))
            for _ in range(images):
                if slot < slots:
                    image_segment_ids[r, slot] = s
                    slot += 1
            spots = rng.choice(
                np.arange(t, end), size=min(end - t, images * n + int(rng.integers(0, 2))), replace=False
            )
            placeholders[r, spots] = True
            t, s = end, s + 1
    features = rng.normal(size=(rows, slots, n, d)).astype(np.float32)
    valid = rng.random((rows, slots, n)) > 0.2
    return features, placeholders, segment_ids, image_segment_ids, valid


def test_features_go_to_their_own_examples_placeholders_in_order():
    rng = np.random.default_rng(0)
    run = jax.jit(place_features)
    for _ in range(5):
        features, placeholders, segment_ids, image_segment_ids, valid = packed_case(rng)
        values, placed = run(features, placeholders, segment_ids, image_segment_ids, valid)
        want_values, want_placed = reference(features, placeholders, segment_ids, image_segment_ids, valid)
        np.testing.assert_array_equal(np.asarray(placed), want_placed)
        np.testing.assert_array_equal(np.asarray(values), want_values)
        assert want_placed.any() and (placeholders & ~want_placed).any()  # the cases hold both outcomes


def test_all_features_valid_by_default():
    rng = np.random.default_rng(1)
    features, placeholders, segment_ids, image_segment_ids, _ = packed_case(rng)
    values, placed = place_features(features, placeholders, segment_ids, image_segment_ids)
    all_valid = np.ones(features.shape[:3], bool)
    want_values, want_placed = reference(features, placeholders, segment_ids, image_segment_ids, all_valid)
    np.testing.assert_array_equal(np.asarray(placed), want_placed)
    np.testing.assert_array_equal(np.asarray(values), want_values)


def test_placement_by_feature_index_with_newlines():
    """LLaVA-NeXT: the data names each placeholder's feature within its own example's slots, -1 = the newline."""
    from vlm_jax.nn.placement import place_by_index

    rng = np.random.default_rng(2)
    features, placeholders, segment_ids, image_segment_ids, _ = packed_case(rng)
    b, m, n, d = features.shape
    newline = rng.normal(size=(d,)).astype(np.float32)
    feature_index = np.zeros(placeholders.shape, np.int32)
    want_values = np.zeros(placeholders.shape + (d,), np.float32)
    want_placed = np.zeros(placeholders.shape, bool)
    for r in range(b):
        for s in set(segment_ids[r].tolist()) - {0}:
            own = [j for j in range(m) if image_segment_ids[r, j] == s]
            for t in np.flatnonzero(placeholders[r] & (segment_ids[r] == s)):
                choice = int(rng.integers(-1, len(own) * n + 2))  # some point past the example's slots
                feature_index[r, t] = choice
                if choice == -1:
                    want_values[r, t], want_placed[r, t] = newline, True
                elif choice < len(own) * n:
                    want_values[r, t], want_placed[r, t] = features[r, own[choice // n], choice % n], True
    values, placed = jax.jit(place_by_index)(
        features, placeholders, segment_ids, image_segment_ids, feature_index, newline
    )
    np.testing.assert_array_equal(np.asarray(placed), want_placed)
    np.testing.assert_array_equal(np.asarray(values), want_values)
    assert want_placed.any() and (placeholders & ~want_placed).any()
