"""digits, gaussian_mixture, teacher and the Dataset container."""

import pytest
import torch

from resgeom_fast.data import Dataset, digits, gaussian_mixture, teacher


def test_digits_split_and_standardisation():
    d = digits()
    assert d.x_train.shape == (1347, 64) and d.x_test.shape == (450, 64)
    assert d.num_classes == 10 and d.task == "classification" and d.y_train.dtype == torch.int64
    assert set(d.y_train.tolist()) == set(range(10))
    # centred per pixel, one global scale: overall train variance 1
    assert d.x_train.mean(0).abs().max() < 1e-5
    assert d.x_train.double().pow(2).mean().item() == pytest.approx(1.0, rel=1e-5)
    assert d.x_test.abs().max() < 10  # no blown-up border pixels
    # stratified: class proportions match
    counts = torch.bincount(d.y_test, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47


def test_digits_fixed_by_seed_and_images():
    a, b, c = digits(seed=0), digits(seed=0), digits(seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    im = digits(image=True)
    assert im.x_train.shape == (1347, 1, 8, 8)
    torch.testing.assert_close(im.x_train.flatten(1), a.x_train)
    torch.testing.assert_close(im.flat().x_test, a.x_test)
    with pytest.raises(ValueError, match=r"test_size: expected a float in \(0, 1\)"):
        digits(test_size=2)


def test_gaussian_mixture():
    g = gaussian_mixture(num_classes=4, dim=5, n=400, separation=6.0, seed=3, n_test=100)
    assert g.x_train.shape == (400, 5) and g.x_test.shape == (100, 5)
    assert torch.bincount(g.y_train).tolist() == [100, 100, 100, 100]
    means = torch.tensor(g.info["means"])
    torch.testing.assert_close(means.norm(dim=1), torch.full((4,), 6.0, dtype=means.dtype))
    emp = torch.stack([g.x_train[g.y_train == c].double().mean(0) for c in range(4)])
    assert (emp - means).norm(dim=1).max() < 0.6  # sample means near the true means (std 1/sqrt(100) per coord)
    assert torch.equal(gaussian_mixture(seed=1).x_train, gaussian_mixture(seed=1).x_train)
    with pytest.raises(ValueError, match=r"num_classes: expected an int >= 2"):
        gaussian_mixture(num_classes=1)


def test_teacher_bottleneck_and_normalisation():
    t = teacher(dims=(30, 3, 30), n=500, seed=0)
    assert t.task == "regression" and t.num_classes is None
    assert t.x_train.shape == (500, 30) and t.y_train.shape == (500, 30) and t.x_test.shape == (500, 30)
    assert t.x_train.double().pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=1e-5)
    assert t.y_train.double().pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=1e-5)
    assert t.y_train.mean(0).abs().max() < 1e-5
    s = torch.linalg.svdvals(t.y_train.double())
    assert s[3] < 1e-4 * s[0] and s[2] > 1e-2 * s[0]  # rank 3 = k*
    s6 = torch.linalg.svdvals(teacher(dims=(30, 6, 3, 30), n=300).y_train.double())
    assert s6[3] < 1e-4 * s6[0]
    with pytest.raises(ValueError, match=r"dims: expected at least two positive ints"):
        teacher(dims=(30,))


def test_dataset_loader_is_deterministic_and_validates():
    d = gaussian_mixture(n=50, n_test=20)
    batches = lambda seed: [yb for _, yb in d.loader("train", batch_size=16, seed=seed)]  # noqa: E731
    a, b, c = batches(0), batches(0), batches(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    test_batches = list(d.loader("test", batch_size=8))
    assert torch.equal(torch.cat([yb for _, yb in test_batches]), d.y_test)  # test not shuffled
    with pytest.raises(ValueError, match=r"split: expected one of \['train', 'test'\], got 'val'"):
        d.loader("val")
    with pytest.raises(ValueError, match=r"y_train: expected 3 rows"):
        Dataset(torch.zeros(3, 2), torch.zeros(2, dtype=torch.int64), torch.zeros(1, 2),
                torch.zeros(1, dtype=torch.int64), num_classes=2)
    assert d.subset(10, 5).x_train.shape[0] == 10
    assert d.to(dtype=torch.float64).x_train.dtype == torch.float64 and d.to(dtype=torch.float64).y_train.dtype == torch.int64
