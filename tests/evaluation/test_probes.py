"""The downstream probes (evaluation.probes) on latents whose answer is known."""

import numpy as np

from vae_lightning.evaluation.probes import fit_probes


def test_probe_is_near_perfect_on_separable_latents_and_chance_on_shuffled_labels():
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 10, 2000), rng.integers(0, 10, 500)

    def feats(y):
        return np.eye(10)[y] * 3 + rng.normal(scale=0.3, size=(len(y), 10))

    res = fit_probes(feats(y_train), y_train, feats(y_test), y_test)
    assert min(res.accuracy.values()) > 0.98
    assert res.confusion.sum() == 500
    shuffled = fit_probes(feats(y_train), rng.permutation(y_train), feats(y_test), y_test)
    assert max(shuffled.accuracy.values()) < 0.2
