"""torchvision_dataset on tiny files written in the real on-disk formats."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from resgeom_fast.data import expected_files, torchvision_dataset


def _write_idx_images(path, images: np.ndarray) -> None:
    n, h, w = images.shape
    with open(path, "wb") as fh:
        fh.write(struct.pack(">IIII", 0x00000803, n, h, w))  # ubyte, 3 dims
        fh.write(images.astype(np.uint8).tobytes())


def _write_idx_labels(path, labels: np.ndarray) -> None:
    with open(path, "wb") as fh:
        fh.write(struct.pack(">II", 0x00000801, len(labels)))  # ubyte, 1 dim
        fh.write(labels.astype(np.uint8).tobytes())


def _make_mnist(root, folder="MNIST", n_train=12, n_test=5):
    rng = np.random.default_rng(0)
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28))
        labels = np.arange(n) % 10
        _write_idx_images(os.path.join(raw, f"{split}-images-idx3-ubyte"), imgs)
        _write_idx_labels(os.path.join(raw, f"{split}-labels-idx1-ubyte"), labels)
        data[split] = (imgs, labels)
    return data


def _make_cifar10(root, per_batch=4, n_test=3):
    rng = np.random.default_rng(1)
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base)
    batches = []
    for i in range(1, 6):
        arr = rng.integers(0, 256, size=(per_batch, 3072)).astype(np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(os.path.join(base, f"data_batch_{i}"), "wb") as fh:
            pickle.dump({"batch_label": f"training batch {i} of 5", "data": arr, "labels": labels,
                         "filenames": [f"f{i}_{j}.png" for j in range(per_batch)]}, fh)
        batches.append((arr, labels))
    arr = rng.integers(0, 256, size=(n_test, 3072)).astype(np.uint8)
    with open(os.path.join(base, "test_batch"), "wb") as fh:
        pickle.dump({"batch_label": "testing batch 1 of 1", "data": arr, "labels": [0, 1, 2][:n_test],
                     "filenames": ["t.png"] * n_test}, fh)
    with open(os.path.join(base, "batches.meta"), "wb") as fh:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_cases_per_batch": per_batch, "num_vis": 3072}, fh)
    return batches


def test_mnist_idx_files(tmp_path):
    data = _make_mnist(str(tmp_path))
    d = torchvision_dataset("mnist", tmp_path, normalize=False)
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert d.num_classes == 10 and d.name == "mnist"
    torch.testing.assert_close(d.x_train[:, 0], torch.from_numpy(data["train"][0]).float() / 255)
    assert d.y_train.tolist() == data["train"][1].tolist()
    flat = torchvision_dataset("mnist", tmp_path, image=False, n_train=4, n_test=2)
    assert flat.x_train.shape == (4, 784) and flat.x_test.shape == (2, 784)
    norm = torchvision_dataset("mnist", tmp_path)
    assert norm.x_train.mean().abs() < 1e-5 and norm.x_train.std().item() == pytest.approx(1.0, rel=1e-3)


def test_fashionmnist_idx_files(tmp_path):
    _make_mnist(str(tmp_path), folder="FashionMNIST", n_train=6, n_test=2)
    d = torchvision_dataset("fashionmnist", tmp_path)
    assert d.x_train.shape == (6, 1, 28, 28)


def test_cifar10_pickle_batches(tmp_path):
    batches = _make_cifar10(str(tmp_path))
    d = torchvision_dataset("cifar10", tmp_path, normalize=False, verify=False)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    first = torch.from_numpy(batches[0][0][0].reshape(3, 32, 32)).float() / 255  # CHW layout in the pickle
    torch.testing.assert_close(d.x_train[0], first)
    assert d.y_train.tolist() == sum((b[1] for b in batches), [])
    # the official md5 sums do not match tiny files: verify=True refuses with a hint
    with pytest.raises(RuntimeError, match=r"verify=False"):
        torchvision_dataset("cifar10", tmp_path)


def test_cifar100_pickle(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(2)
    for name, n in (("train", 6), ("test", 2)):
        with open(base / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, size=(n, 3072)).astype(np.uint8),
                         "fine_labels": list(range(n)), "coarse_labels": [0] * n}, fh)
    with open(base / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["x"] * 20}, fh)
    d = torchvision_dataset("cifar100", tmp_path, verify=False)
    assert d.num_classes == 100 and d.x_train.shape == (6, 3, 32, 32) and d.y_test.tolist() == [0, 1]


def test_missing_folder_lists_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        torchvision_dataset("cifar10", tmp_path / "nowhere")
    msg = str(err.value)
    for f in ("cifar-10-batches-py", "data_batch_1", "data_batch_5", "test_batch", "batches.meta"):
        assert f in msg
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw/train-images-idx3-ubyte"):
        torchvision_dataset("mnist", tmp_path)
    assert expected_files("mnist", "/r")[0] == os.path.join("/r", "MNIST", "raw", "train-images-idx3-ubyte")
    with pytest.raises(ValueError, match=r"name: expected one of \['mnist', 'fashionmnist', 'cifar10', 'cifar100'\]"):
        torchvision_dataset("svhn", tmp_path)
