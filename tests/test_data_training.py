import numpy as np
import pytest
import torch

from mldeploy import data, models, runtime, training


def test_moons_are_seeded_balanced_and_split_as_the_chapter_says():
    a, b = data.load_moons(seed=3), data.load_moons(seed=3)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert (len(a.x_train), len(a.x_test)) == (1600, 400)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    x, y = data.make_moons(2000, seed=0)
    assert y.sum() == 1000
    assert not np.array_equal(data.load_moons(seed=4).x_train, a.x_train)


@pytest.mark.parametrize(
    "kwargs", [{"n_samples": 1}, {"test_fraction": 0.0}, {"test_fraction": 1.5}]
)
def test_bad_data_arguments_raise_clear_errors(kwargs):
    with pytest.raises(ValueError):
        data.load_moons(**kwargs)


def test_training_is_reproducible_and_learns(split):
    def run():
        training.set_seed(0)
        model = models.SimpleMLP()
        history = training.train_classifier(model, split.x_train, split.y_train, epochs=5)
        return model, history

    (m1, h1), (m2, h2) = run(), run()
    assert h1 == h2
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert h1[-1] < 0.5 * h1[0]
    assert training.accuracy(training.predict_logits(m1, split.x_test), split.y_test) > 0.95


def test_simple_mlp_matches_the_draft_architecture():
    model = models.SimpleMLP()
    assert model.describe() == "SimpleMLP (2 -> 64 -> 32 -> 2)"
    assert models.count_parameters(model) == 2 * 64 + 64 + 64 * 32 + 32 + 32 * 2 + 2


def test_softmax_rows_sum_to_one():
    p = runtime.softmax(np.array([[1000.0, 0.0], [-3.0, 2.0]]))
    assert np.allclose(p.sum(axis=1), 1.0) and np.isfinite(p).all()
