"""Issue 16: resgeom_fast.core.distributed without a process group (shard, the collectives'
one-process behaviour) and the operators' ``distributed=`` checks."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from resgeom_fast.core import distributed as dist
from resgeom_fast.core.checks import ArgumentTypeError, ArgumentValueError
from resgeom_fast.linalg._util import generator
from resgeom_fast.operators._data import Batches
from tests.distributed._cases import fc_model, operator


def _batch(n):
    return torch.arange(n * 2, dtype=torch.float64).reshape(n, 2), torch.arange(n)


@pytest.mark.parametrize("n,world", [(12, 3), (13, 3), (2, 3), (0, 2), (5, 1)])
def test_shard_of_a_batch_is_a_contiguous_split_without_padding(n, world):
    x, y = _batch(n)
    parts = [dist.shard((x, y), r, world) for r in range(world)]
    sizes = [p[0].shape[0] for p in parts]
    assert sizes == dist.shard_sizes(n, world)
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert all(p[0].data_ptr() == x[sum(sizes[:r]):].data_ptr() for r, p in enumerate(parts) if sizes[r])  # views


def test_shard_of_a_batch_keeps_non_tensor_labels():
    x, _ = _batch(4)
    assert dist.shard((x, "labels"), 1, 2)[1] == "labels"


@pytest.mark.parametrize("n,world", [(10, 3), (2, 3), (7, 7)])
def test_shard_of_a_dataset_is_distributed_sampler_order(n, world):
    ds = TensorDataset(*_batch(n))
    parts = [dist.shard(ds, r, world) for r in range(world)]
    for r, p in enumerate(parts):
        assert p.indices == list(range(r, n, world))
    assert sorted(i for p in parts for i in p.indices) == list(range(n))     # each sample once


def test_shard_of_batches_and_of_a_loader():
    batches = [_batch(i + 1) for i in range(5)]
    assert [b[0].shape[0] for b in dist.shard(batches, 1, 3)] == [2, 5]
    assert dist.shard(batches[:1], 2, 3) == []
    loader = DataLoader(TensorDataset(*_batch(10)), batch_size=3)
    share = dist.shard(loader, 0, 2)
    for _ in range(2):                              # re-iterable: the same batches on every pass
        got = [b[1].tolist() for b in share]
        assert got == [[0, 1, 2], [6, 7, 8]]


def test_shard_errors():
    x, y = _batch(4)
    with pytest.raises(ArgumentValueError, match=r"shard: expected rank in \[0, 1\] \(world 2\), got 2"):
        dist.shard((x, y), 2, 2)
    with pytest.raises(ArgumentValueError, match="shard: expected world"):
        dist.shard((x, y), 0, 0)
    with pytest.raises(ArgumentTypeError, match="one-shot iterator"):
        dist.shard(iter([(x, y)]), 0, 2)
    with pytest.raises(ArgumentTypeError, match="shard: expected data an"):
        dist.shard(3.0, 0, 2)


def test_collectives_without_a_process_group():
    assert not dist.is_initialized() and dist.rank() == 0 and dist.world_size() == 1
    a, b = torch.ones(2, 3, dtype=torch.float32), torch.arange(4, dtype=torch.float64)
    ra, rb = dist.all_reduce_sum([a, b])
    assert ra.dtype == torch.float32 and ra.shape == (2, 3) and torch.equal(ra, a) and torch.equal(rb, b)
    assert ra.data_ptr() != a.data_ptr()
    assert dist.all_reduce_sum([]) == []
    with pytest.raises(ArgumentTypeError, match=r"all_reduce_sum: expected tensors\[1\] a torch.Tensor"):
        dist.all_reduce_sum([a, 1.0])
    assert dist.broadcast_object({"k": 1}) == {"k": 1}
    dist.raise_together("f", None)
    with pytest.raises(KeyError):
        dist.raise_together("f", KeyError("x"))


def test_batches_allow_empty_and_global_total():
    b = Batches("f", [], torch.float64, torch.device("cpu"), materialise=False, allow_empty=True)
    assert b.local_total == 0 and list(b) == []
    with pytest.raises(ArgumentValueError, match="f: data yielded no batches"):
        Batches("f", [], torch.float64, torch.device("cpu"), materialise=False)
    x, y = _batch(4)
    b = Batches("f", (x, y), torch.float64, torch.device("cpu"), materialise=False, allow_empty=True)
    b.set_total(10)
    assert [w for w, _, _ in b] == [0.4] and b.local_total == 4 and b.total == 10
    with pytest.raises(ArgumentValueError, match="f: expected a global sample count >= this rank's 4, got 3"):
        b.set_total(3)
    empty = Batches("f", (x[:0], y[:0]), torch.float64, torch.device("cpu"), materialise=True, allow_empty=True)
    assert empty.sizes == [] and list(empty) == []


def test_operator_distributed_argument_checks():
    data = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    with pytest.raises(ArgumentValueError, match=r"hessian: expected an initialised torch.distributed process group "
                                                 r"for distributed='split'"):
        operator("hessian", fc_model(), data, "split")
    with pytest.raises(ArgumentValueError, match="hessian: expected distributed"):
        operator("hessian", fc_model(), data, "auto")
    H = operator("hessian", fc_model(), data, None)
    assert H.distributed is None and H.rank_samples == [6] and H.num_samples == 6


def test_seed_none_without_a_group_still_draws_fresh_numbers():
    class Op:
        distributed = "split"
    a = torch.randn(4, generator=generator(None, Op()))
    b = torch.randn(4, generator=generator(None, Op()))
    assert not torch.equal(a, b)
    assert torch.equal(torch.randn(4, generator=generator(3, Op())), torch.randn(4, generator=generator(3)))


def test_comm_device_routes_cpu_buffers_through_cuda_under_pure_nccl(monkeypatch):
    """A pure NCCL group reduces CUDA tensors only: the CPU buffers of the analyses' gathers go
    through the current CUDA device; gloo and the mixed "cpu:gloo,cuda:nccl" keep them on the CPU."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, want in (("nccl", torch.device("cuda", 3)), ("gloo", torch.device("cpu")),
                          ("cpu:gloo,cuda:nccl", torch.device("cpu"))):
        monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None, b=backend: b)
        assert dist.comm_device(torch.device("cpu")) == want, backend
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    assert dist.comm_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
