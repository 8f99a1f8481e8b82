"""resgeom_fast.core.modules: hook capture, module modes and the one data contract."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from resgeom_fast.core.checks import ArgumentTypeError, ArgumentValueError
from resgeom_fast.core.modules import (
    DEFAULT_BATCH_SIZE,
    as_batches,
    capture_inputs,
    capture_outputs,
    data_source,
    is_batch,
    module_mode,
)
from resgeom_fast.data import Dataset
from resgeom_fast.operators import fixed_sample, hessian
from resgeom_fast.operators import _data
from tests.operators._operator_nets import FCNet, rel

CE = nn.CrossEntropyLoss()


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def _hooks(m: nn.Module) -> int:
    return sum(len(s._forward_hooks) + len(s._forward_pre_hooks) for s in m.modules())


# -- hooks ---------------------------------------------------------------------------------------
def test_capture_outputs_and_inputs():
    net = _net().eval()
    x = torch.randn(5, 3)
    with capture_outputs([net[0], net[3]]) as out, capture_inputs(net[3]) as inp:
        y = net(x)
    assert torch.equal(out.values[1], y) and out.calls == [1, 1] and out.complete
    assert torch.equal(inp.values[0], torch.relu(net[1](net[0](x))))
    assert not out.values[1].requires_grad and _hooks(net) == 0


def test_capture_stop_ends_the_forward_pass_and_first_call_is_kept():
    net = _net().eval()
    reached = []
    with capture_outputs(net[0], stop=True) as cap:
        net(torch.randn(2, 3))
        reached.append(True)              # skipped: the pass stopped at net[0]
    assert not reached and cap.complete and cap.values[0].shape == (2, 4) and _hooks(net) == 0
    with capture_outputs([net[0], net[0]]) as cap:
        a = net[0](torch.ones(1, 3))
        net[0](torch.zeros(1, 3))
    assert cap.calls == [2, 2] and torch.equal(cap.values[0], a) and cap.values[1] is cap.values[0]
    cap.reset()
    assert cap.calls == [0, 0] and cap.missing() == [0, 1]


def test_capture_on_call_sees_every_call():
    lin = nn.Linear(2, 2)
    seen = []
    with capture_outputs([nn.ReLU(), lin], on_call=lambda i, v: seen.append((i, v.shape))):
        for _ in range(3):
            lin(torch.ones(4, 2))
    assert seen == [(1, (4, 2))] * 3


def test_hooks_removed_on_exception():
    net = _net()
    with pytest.raises(RuntimeError, match="boom"):
        with capture_outputs(list(net)), capture_inputs(list(net)):
            assert _hooks(net) == 8
            raise RuntimeError("boom")
    assert _hooks(net) == 0
    with pytest.raises(ArgumentTypeError, match=r"^capture_outputs: expected modules\[1\] an nn.Module, got int$"):
        with capture_outputs([net[0], 3]):
            pass


# -- module modes --------------------------------------------------------------------------------
def test_module_mode_restores_every_submodule():
    net = _net().train()
    net[1].eval()                           # a mixed state must come back exactly
    before = [m.training for m in net.modules()]
    with module_mode(net, False) as m:
        assert m is net and not any(x.training for x in net.modules())
    assert [m.training for m in net.modules()] == before
    with pytest.raises(RuntimeError):
        with module_mode(net, True):
            assert all(x.training for x in net.modules())
            raise RuntimeError
    assert [m.training for m in net.modules()] == before


def test_module_mode_batchnorm_train_uses_batch_statistics_without_updating():
    net = _net()
    bn = net[1]
    mean = bn.running_mean.clone()
    x = torch.randn(8, 3)
    with module_mode(net, False, batchnorm="train"):
        assert bn.training and not net[0].training and bn.track_running_stats is False
        out = net(x)
    assert torch.equal(bn.running_mean, mean) and bn.track_running_stats is True
    with module_mode(net, True):
        ref = net(x)                        # batch statistics (and a running-stat update)
    torch.testing.assert_close(out, ref)
    with module_mode(net, True, batchnorm="eval"):
        assert net[0].training and not bn.training


def test_module_mode_errors_and_the_operators_spelling():
    net = _net()
    with pytest.raises(ValueError, match=r"^batchnorm: expected 'eval' or 'train', got 'batch'$"):
        with module_mode(net, False, batchnorm="batch"):
            pass
    with pytest.raises(ArgumentTypeError, match=r"^module_mode: expected training a bool, got 'eval'$"):
        with module_mode(net, "eval"):
            pass
    with pytest.raises(ValueError, match=r"^batchnorm: expected 'eval' or 'train', got 'x'$"):
        _data.module_mode(net, "x")
    net.train()
    with _data.module_mode(net, "train"):
        assert net[1].training and not net[0].training
    assert all(m.training for m in net.modules())


# -- the data contract ---------------------------------------------------------------------------
def _xy(n=10):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)


def _sizes(data, **kw):
    return [len(x) for x, _ in as_batches("f", data, **kw)]


def test_every_form_of_data():
    x, y = _xy(300)
    assert _sizes((x, y)) == [300] and _sizes([x, y]) == [300]
    assert _sizes((x, y), batch_size=128) == [128, 128, 44]
    assert _sizes([(x[:5], y[:5]), (x[5:], y[5:])]) == [5, 295]
    assert _sizes(DataLoader(TensorDataset(x, y), batch_size=100)) == [100, 100, 100]
    # a map-style torch Dataset: in order, DEFAULT_BATCH_SIZE per batch
    assert DEFAULT_BATCH_SIZE == 128
    batches = list(as_batches("f", TensorDataset(x, y)))
    assert [len(b[0]) for b in batches] == [128, 128, 44] and torch.equal(torch.cat([b[0] for b in batches]), x)
    assert _sizes(TensorDataset(x, y), batch_size=150) == [150, 150]
    # a resgeom_fast Dataset: its split, whole or in batches
    ds = Dataset(x, y, x[:7], y[:7], num_classes=2)
    assert _sizes(ds) == [300] and _sizes(ds, split="test") == [7] and _sizes(ds, batch_size=200) == [200, 100]
    # (x, y, extra) batches are read as (x, y)
    (b,) = list(as_batches("f", [(x, y, "meta")]))
    assert len(b) == 2 and b[1] is y


def test_data_source_reads_again_the_same_way():
    x, y = _xy(20)
    src = data_source("f", TensorDataset(x, y), batch_size=8)
    assert isinstance(src, DataLoader)
    first = [b[0] for b in src]
    assert all(torch.equal(a, b) for a, b in zip(first, [b[0] for b in src]))
    assert is_batch(data_source("f", (x, y))) and not is_batch([(x, y)])


def test_data_errors():
    x, y = _xy()
    with pytest.raises(TypeError, match=r"^f: expected data an \(x, y\) batch or an iterable of \(x, y\) batches"
                                        r" \(a DataLoader, a list of batches\), or a Dataset, got int$"):
        list(as_batches("f", 3))
    with pytest.raises(TypeError, match=r"^f: expected batch 1 of data to be \(x, y, \.\.\.\), got int$"):
        list(as_batches("f", [(x, y), 3]))
    with pytest.raises(ValueError, match=r"^f: expected data on the model's device meta, got x on cpu$"):
        list(as_batches("f", (x, y), device=torch.device("meta")))
    with pytest.raises(ValueError, match=r"^f: expected x of dtype torch.float64 \(the model's\), got torch.float32$"):
        list(as_batches("f", (x, y), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^f: expected y with 10 rows in batch 0, got \(9,\)$"):
        list(as_batches("f", (x, y[:9])))
    with pytest.raises(ArgumentValueError, match=r"^f: expected data with at least one batch, got an empty iterable$"):
        list(as_batches("f", []))
    with pytest.raises(ArgumentValueError, match=r"^f: expected batch_size a positive int, got 0$"):
        list(as_batches("f", (x, y), batch_size=0))
    with pytest.raises(ValueError, match=r"^f: expected split one of \['train', 'test'\], got 'val'$"):
        list(as_batches("f", Dataset(x, y, x, y, num_classes=2), split="val"))


def test_iterable_dataset_is_an_iterable_of_batches():
    x, y = _xy(6)

    class Stream(IterableDataset):
        def __iter__(self):
            yield x[:3], y[:3]
            yield x[3:], y[3:]

    assert _sizes(Stream()) == [3, 3]


# -- the operators accept every form too ---------------------------------------------------------
def _hessian_data(n=40):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_hessian_over_a_dataset_equals_hessian_over_the_batch():
    torch.set_num_threads(1)
    model = FCNet(width=4).double()
    x, y = _hessian_data()
    dense = hessian(model, CE, (x, y)).to_dense()
    for data in (TensorDataset(x, y), Dataset(x, y, x[:3], y[:3], num_classes=3)):
        H = hessian(model, CE, data).to_dense()
        assert rel(H, dense) < 1e-12
    # a torch Dataset read in batches of DEFAULT_BATCH_SIZE: more samples than one batch
    x2, y2 = _hessian_data(300)
    assert rel(hessian(model, CE, TensorDataset(x2, y2)).to_dense(), hessian(model, CE, (x2, y2)).to_dense()) < 1e-10
    # fixed_sample reads a resgeom_fast Dataset too (its train split)
    assert [len(b[0]) for b in fixed_sample(Dataset(x, y, x, y, num_classes=3), batch_size=16)] == [16, 16, 8]


def test_a_package_dataset_is_one_cached_batch_of_the_hessian():
    """A resgeom_fast Dataset is read as its whole train split, one batch: the operator keeps its
    graphs as for an (x, y) batch (cache defaults to True for one batch) and equals it."""
    import dataclasses

    import resgeom_fast as rg

    d = rg.data.digits(seed=0)
    ds = dataclasses.replace(d, x_train=d.x_train.double(), x_test=d.x_test.double())
    model = rg.models.FCResNet(64, 6, 1, 10, seed=0).double().eval()
    x, y = ds.tensors("train")
    H_ds = hessian(model, torch.nn.CrossEntropyLoss(), ds, hvp="double_backward")
    H_b = hessian(model, torch.nn.CrossEntropyLoss(), (x, y), hvp="double_backward")
    assert H_ds._engine.cache and H_b._engine.cache
    v = torch.randn(H_b.shape[1], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(H_ds.matmat(v), H_b.matmat(v), rtol=1e-12, atol=1e-14)
