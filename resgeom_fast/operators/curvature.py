"""Curvature operators of a loss: a base class that owns the data loop, and one subclass per curvature.

:class:`CurvatureOperator` (a symmetric :class:`~resgeom_fast.linalg.operator.LinearOperator`)
owns what every curvature shares: the data (one batch or a DataLoader, fingerprinted on every
pass), the batch weights ``batch size / total`` of the mean loss, the parameter vector space
(:meth:`~CurvatureOperator.flatten` / :meth:`~CurvatureOperator.unflatten`), the cached
per-batch graphs and primal passes, passes of at most ``max_vectors_per_pass`` vectors, the
product precision, and the choice of product method (:mod:`resgeom_fast.operators._autotune`).
Each curvature supplies only its per-batch product, in three forms (the functions of
:mod:`resgeom_fast.operators._products`):

- :meth:`~CurvatureOperator.batch_graph` / :meth:`~CurvatureOperator.graph_product`: the double
  backward (a gradient graph built once per batch, k vectors as one batched backward);
- :meth:`~CurvatureOperator.func_product`: forward-over-reverse with torch.func;
- :meth:`~CurvatureOperator.structured_engine`: the structured (autograd-free) R-operator, or why
  there is none (the base class: none): :class:`~resgeom_fast.operators._structured.StructuredHVP`
  on this package's FC ResNets, else :class:`~resgeom_fast.operators._structured_conv.GraphHVP` over
  the torch.fx trace of the model (:mod:`resgeom_fast.operators._graph`).

:class:`HessianOperator` and :class:`GGNOperator` are the two curvatures; the public constructors
:func:`~resgeom_fast.operators.hessian.hessian`, :func:`~resgeom_fast.operators.hessian.ggn` and
:func:`~resgeom_fast.operators.hessian.block_hessians` (whose operators share one set of graphs,
held by a :class:`CurvatureEngine`) and the behaviour they document live in
:mod:`resgeom_fast.operators.hessian`.
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn


from resgeom_fast.core import distributed as dist
from resgeom_fast.core.checks import ArgumentValueError, check_choice, check_type, type_error
from resgeom_fast.core.modules import data_source, is_map_dataset
from resgeom_fast.linalg.operator import LinearOperator
from resgeom_fast.operators._autotune import AutoTuner, resolve_hvp, verify_tolerance
from resgeom_fast.operators._data import Batches, has_batchnorm, is_single_batch, module_mode
from resgeom_fast.operators._mean_contract import LossFn, check_loss, check_mean_contract
from resgeom_fast.operators._precision import check_precision, product_precision, resolve_matmul
from resgeom_fast.operators._products import (
    accumulate,
    ggn_func_product,
    ggn_graph,
    ggn_graph_product,
    hessian_func_product,
    hessian_graph,
    hessian_graph_product,
    structured_primal,
)
from resgeom_fast.operators._graph import trace_graph
from resgeom_fast.operators._structured import StructuredHVP, parse_structured, structured_loss
from resgeom_fast.operators._structured_conv import GraphHVP, graph_primal

__all__ = ["DISTRIBUTED_MODES", "CurvatureEngine", "CurvatureOperator", "GGNOperator", "HessianOperator"]

DISTRIBUTED_MODES = ("split", "sharded")
"""``distributed=`` of the curvature operators (None: one process; see :class:`CurvatureEngine`)."""


def check_distributed(fn: str, distributed: Optional[str]) -> Optional[str]:
    """``distributed`` if it is None or one of :data:`DISTRIBUTED_MODES` and, when given, a process
    group is initialised; else an error naming ``fn``."""
    if distributed is None:
        return None
    check_choice(fn, "distributed", distributed, DISTRIBUTED_MODES)
    if not dist.is_initialized():
        raise ArgumentValueError(
            f"{fn}: expected an initialised torch.distributed process group for distributed={distributed!r} "
            f"(torch.distributed.init_process_group, e.g. under torchrun), got none; pass distributed=None "
            f"for a single-process operator")
    return distributed


class CurvatureEngine:
    """Per-batch state shared by the operators of one curvature on subsets of one parameter list
    (:func:`~resgeom_fast.operators.hessian.block_hessians` shares one engine among its blocks).

    Checks the arguments, reads the data (:class:`~resgeom_fast.operators._data.Batches`), checks
    the mean contract on the first batch, builds and caches the per-batch graphs / primal passes,
    and runs the data loop of every product method (:meth:`_apply_method`), handing the choice of
    method to an :class:`~resgeom_fast.operators._autotune.AutoTuner`.

    Data parallelism (``distributed``; docs/distributed.md): None (default) computes on this
    process's data alone, also inside an initialised process group. With a process group
    initialised (torch.distributed), every rank builds the operator with the same model
    parameters and arguments, and

    - ``"split"``: every rank passes the *same full* data; each takes its share
      (:func:`resgeom_fast.core.distributed.shard`: a contiguous block of one ``(x, y)`` batch or
      of a resgeom_fast Dataset's split, indices ``rank::world`` of a map-style torch Dataset,
      batches ``rank::world`` of a list of batches or a DataLoader);
    - ``"sharded"``: every rank passes *its own* share (e.g. a DataLoader with a
      DistributedSampler without padding; an empty list on a rank without data).

    A product is then each rank's local weighted sum (weights ``batch size / global sample
    count``) followed by ONE all_reduce, so every rank holds the single-process operator's
    product (equal up to summation order). The same buffer carries, per rank, a failure flag
    and a fingerprint of the vectors: a local exception is raised on every rank (the lowest
    failing rank's, :func:`~resgeom_fast.core.distributed.raise_together`), and vectors that
    differ between ranks raise :class:`~resgeom_fast.core.distributed.DivergentRanksError`
    everywhere instead of summing products of different vectors; at construction, parameters
    that differ from rank 0's (a fingerprint of up to 1024 evenly spaced entries per tensor)
    raise it too. The auto-tuner's timings and
    verification results are rank 0's (broadcast), so every rank takes the same product method.
    Construction, ``matmat`` and ``clear_cache`` are collectives: call them on every rank, in
    the same order. "auto" is not offered: whether the data given are the full data or this
    rank's share cannot be guessed. Host syncs: one per product (the failure flags are read).
    """

    def __init__(self, fn: str, curvature: type[CurvatureOperator], model: nn.Module, loss_fn: LossFn,
                 data: Any, names: list[str], params: list[Tensor], batchnorm: str, hvp: str,
                 cache: Optional[bool], matmul: str, deterministic: bool, precision: str,
                 distributed: Optional[str] = None) -> None:
        self.distributed = check_distributed(fn, distributed)
        if not callable(loss_fn):
            raise type_error(fn, "loss_fn", "callable", loss_fn)
        check_choice(None, f"{fn}: batchnorm", batchnorm, ("eval", "train"), expected="'eval' or 'train'")
        self.fn, self.curvature, self.model, self.loss_fn = fn, curvature, model, loss_fn
        self.precision = check_precision(fn, precision)
        self.names, self.params, self.batchnorm = names, params, batchnorm
        self.dtype, self.device = params[0].dtype, params[0].device
        self.hvp = resolve_hvp(fn, hvp)
        self.deterministic = check_type(fn, "deterministic", deterministic, bool, "a bool")
        self.matmul = matmul
        backends = resolve_matmul(fn, matmul, self.dtype, self.device)
        self.structured: Optional[Union[StructuredHVP, GraphHVP]] = None
        structured_off: Optional[str] = None  # why the structured path is not used
        if self.hvp in ("auto", "structured"):
            structured, why = curvature.structured_engine(model, params, loss_fn, batchnorm)
            if structured is None:
                if self.hvp == "structured":
                    raise ArgumentValueError(f"{fn}: hvp='structured' does not apply: {why}; use hvp='auto'")
                structured_off = why
            else:
                self.structured = structured
        self.tuner = AutoTuner(fn, self.hvp, matmul, backends, deterministic, self.dtype, self.device,
                               self._apply_method, structured_off=structured_off,
                               distributed=self.distributed is not None,
                               time_structured=isinstance(self.structured, GraphHVP) and self.structured.has_conv)
        self._primals: Optional[list[tuple[float, Any]]] = None
        self._forward_checked = False    # the structured logits matched model(x) over a whole pass
        bn_train = batchnorm == "train" and has_batchnorm(model)
        if self.distributed == "split" and bn_train and (is_map_dataset(data) or
                                                         is_single_batch(data_source(fn, data))):
            raise ArgumentValueError(
                f"{fn}: distributed='split' with batchnorm='train' needs data as a list of batches or a "
                f"DataLoader (whole batches go to each rank), got one batch or a Dataset, whose samples would "
                f"be regrouped (other batch statistics than the single-process operator's)")
        self._graphs: Optional[list[tuple[float, Any]]] = None
        self.rank_samples: list[int] = [0]   # samples per rank (data-parallel), else [total]
        err: Optional[Exception] = None
        try:
            local = self._local_share(data)
            # one batch (also a resgeom_fast Dataset, read as its whole split) keeps its graphs
            self.cache = is_single_batch(data_source(fn, local)) if cache is None else bool(cache)
            strict_why = ("batchnorm='train' (batch statistics)" if bn_train
                          else "deterministic=True" if deterministic else "")
            self.batches = Batches(fn, local, self.dtype, self.device, materialise=self.cache,
                                   strict=bool(strict_why), strict_why=strict_why,
                                   allow_empty=self.distributed is not None)
            if bn_train and self.batches.sizes and min(self.batches.sizes) < 2:
                raise ArgumentValueError(
                    f"{fn}: batchnorm='train' needs batches of at least 2 samples (batch statistics of "
                    f"one sample are degenerate), got a batch of size {min(self.batches.sizes)}"
                )
        except Exception as exc:       # raised on every rank (data-parallel), else as it is
            err = exc
        num_batches = self._count(fn, err)
        if isinstance(self.structured, GraphHVP):
            # its GGN's logit Jacobians pay off only on primal passes kept between calls, and the
            # kept batches share their memory budget
            self.structured.cached = self.cache
            self.structured.kept_batches = len(self.batches.sizes) if self.cache else 1
        with product_precision(self.precision):
            err = None
            try:
                self.loss_reduction = "not checked: this rank holds no data"
                if self.batches.first is not None:
                    x0, y0 = self.batches.first
                    self.loss_reduction = check_mean_contract(fn, model, loss_fn, x0, y0, batchnorm,
                                                              single_batch=num_batches == 1)
                    if self._caches_graphs:
                        self._graphs = [self._build(w, x, y) for w, x, y in self.batches]
                    else:  # validate the loss on the first batch
                        with torch.no_grad(), module_mode(model, batchnorm):
                            check_loss(fn, loss_fn(model(x0), y0))
            except Exception as exc:
                err = exc
            if self.distributed is not None:
                dist.raise_together(fn, err)
                # the finding of the first rank with data (every rank with data checked its first batch)
                first = next(r for r, n in enumerate(self.rank_samples) if n > 0)
                self.loss_reduction = dist.broadcast_object(self.loss_reduction, src=first, fn=fn)
            elif err is not None:
                raise err

    def _local_share(self, data: Any) -> Any:
        """This rank's data: ``data`` itself (one process, ``"sharded"``) or its share (``"split"``)."""
        if self.distributed != "split":
            return data
        # a torch Dataset is split by index (then read in batches); anything else as data_source reads it
        return dist.shard(data if is_map_dataset(data) else data_source(self.fn, data))

    def _count(self, fn: str, err: Optional[Exception]) -> int:
        """Raise a local failure of reading the data on every rank; set the global sample count
        (and ``rank_samples``); return the global number of batches."""
        if self.distributed is None:
            if err is not None:
                raise err
            self.rank_samples = [self.batches.total]
            return len(self.batches.sizes)
        dist.raise_together(fn, err)
        world, r = dist.world_size(), dist.rank()
        # per rank: samples, batches, and a fingerprint of the parameters (which must be equal)
        counts = torch.zeros(3, world, dtype=torch.float64, device=self.device)
        counts[0, r], counts[1, r] = self.batches.local_total, len(self.batches.sizes)
        fp, scale = dist.fingerprint([p.detach().reshape(1, -1) for p in self.params], self.device)
        counts[2, r] = fp[0]
        (counts,) = dist.all_reduce_sum([counts], fn=fn)
        tol = 1000 * torch.finfo(self.dtype).eps * float(scale[0]) + torch.finfo(torch.float64).tiny
        rows = counts.tolist()
        bad = [i for i, f in enumerate(rows[2]) if abs(f - rows[2][0]) > tol]
        if bad:
            raise dist.DivergentRanksError(
                f"{fn}: expected the same model parameters on every rank (a data-parallel operator sums the ranks' "
                f"products), got other parameters on rank(s) {bad} than on rank 0; load the same checkpoint or "
                f"seed on every rank")
        self.rank_samples = [int(c) for c in rows[0]]
        total, num_batches = sum(self.rank_samples), int(sum(rows[1]))
        if total == 0:
            raise ArgumentValueError(f"{fn}: data yielded no batches on any of the {world} ranks")
        self.batches.set_total(total)
        return num_batches

    @property
    def _caches_graphs(self) -> bool:
        """Whether the double backward's graphs are kept (cache on, and a method that may use them)."""
        return self.cache and self.hvp in ("double_backward", "auto")

    def clear_cache(self) -> None:
        """Drop the cached primal passes and graphs; the graphs are rebuilt now when kept (a
        collective when data-parallel: a failure on one rank raises on all)."""
        self._primals = None
        err: Optional[Exception] = None
        try:
            if self._graphs is not None:
                self._graphs = None
                if self._caches_graphs:
                    self._graphs = [self._build(w, x, y) for w, x, y in self.batches]
        except Exception as exc:
            err = exc
        if self.distributed is not None:
            dist.raise_together(self.fn, err)
        elif err is not None:
            raise err

    def apply(self, idx: list[int], vs: list[Tensor], k: int) -> list[Tensor]:
        """Curvature products restricted to params ``idx``: ``vs[j]`` is [k, *shape of idx[j]].

        Runs under the operator's ``precision`` (IEEE float32 on CUDA unless "tf32";
        :mod:`resgeom_fast.operators._precision`)."""
        with product_precision(self.precision):
            return self.tuner.apply(idx, vs, k)

    # -- the data loop of each method ------------------------------------------------------------
    def _apply_method(self, method: str, idx: list[int], vs: list[Tensor], k: int) -> list[Tensor]:
        """The product by ``method`` ("structured", "double_backward", "forward_over_reverse"),
        weighted over the batches (of every rank, when data-parallel)."""
        if self.distributed is None:
            acc = self._local_product(method, idx, vs, k)
            assert acc is not None
            return acc
        err: Optional[Exception] = None
        acc = None
        try:
            acc = self._local_product(method, idx, vs, k)
        except Exception as exc:       # raised on every rank after the all_reduce
            err = exc
        if acc is None:                # no data on this rank, or it failed: it adds zeros
            acc = [torch.zeros_like(v) for v in vs]
        return self._all_reduce(acc, vs, k, err)

    def _all_reduce(self, acc: list[Tensor], vs: list[Tensor], k: int, err: Optional[Exception]) -> list[Tensor]:
        """Sum the ranks' local products in ONE all_reduce; its tail holds per rank a failure flag
        and a fingerprint of ``vs`` (``probe . v`` per column), compared across ranks afterwards."""
        world, r = dist.world_size(), dist.rank()
        fp, scale = dist.fingerprint([v.detach().reshape(k, -1) for v in vs], self.device)
        tail = torch.zeros(world, k + 1, dtype=torch.float64, device=self.device)
        tail[r, 0] = 1.0 if err is not None else 0.0
        tail[r, 1:] = fp
        *out, tail = dist.all_reduce_sum([*acc, tail], dtype=acc[0].dtype, fn=self.fn)
        tol = 1000 * torch.finfo(acc[0].dtype).eps * scale + torch.finfo(torch.float64).tiny
        off = ((tail[:, 1:] - tail[0, 1:]).abs() > tol).any(dim=1)
        flags = torch.stack([tail[:, 0] != 0, off]).tolist()              # the one host sync
        if any(flags[0]):
            dist.raise_together(self.fn, err)
        if any(flags[1]):
            bad = [i for i, f in enumerate(flags[1]) if f]
            raise dist.DivergentRanksError(
                f"{self.fn}: expected every rank to apply the operator to the same vectors (a data-parallel "
                f"operator sums the ranks' products), got other vectors on rank(s) {bad} than on rank 0; replicated "
                f"algorithms need the same seed on every rank (seed=None draws one on rank 0 only for operators "
                f"with a `distributed` attribute), and a caller's own vectors must be equal on every rank")
        return out

    def _local_product(self, method: str, idx: list[int], vs: list[Tensor], k: int) -> Optional[list[Tensor]]:
        """This process's weighted sum over its batches (None: it holds no batch)."""
        if method == "forward_over_reverse":
            return self._apply_func(idx, vs, k)
        acc: Optional[list[Tensor]] = None
        if method == "structured":
            assert self.structured is not None
            for w, st in self._primals_iter():
                acc = accumulate(acc, self.structured.apply(st, idx, vs, k), w)
        else:
            for w, graph in self._graphs_iter():
                acc = accumulate(acc, self.curvature.graph_product(graph, self.params, idx, vs, k), w)
        return acc

    def _apply_func(self, idx: list[int], vs: list[Tensor], k: int) -> Optional[list[Tensor]]:
        names = [self.names[i] for i in idx]
        primals = tuple(self.params[i].detach() for i in idx)
        acc: Optional[list[Tensor]] = None
        for w, x, y in self.batches:
            with module_mode(self.model, self.batchnorm):
                res = self.curvature.func_product(self.model, self.loss_fn, names, primals, x, y, vs)
            acc = accumulate(acc, [r.detach() for r in res], w)
        return acc

    def _build(self, w: float, x: Tensor, y: Any) -> tuple[float, Any]:
        with torch.enable_grad(), module_mode(self.model, self.batchnorm), product_precision(self.precision):
            return (w, self.curvature.batch_graph(self.fn, self.model, self.loss_fn, self.params, x, y))

    def _graphs_iter(self) -> Iterator[tuple[float, Any]]:
        if self._graphs is not None:
            yield from self._graphs
        else:
            for w, x, y in self.batches:
                yield self._build(w, x, y)

    def _primals_iter(self) -> Iterator[tuple[float, Any]]:
        if self._primals is not None:
            yield from self._primals
            return
        built = []              # kept only when caching: an uncached pass holds one batch at a time
        for w, x, y in self.batches:
            item = (w, self._primal(x, y))
            if self.cache:
                built.append(item)
            yield item
        self._forward_checked = True
        if self.cache:
            self._primals = built

    def _primal(self, x: Tensor, y: Any) -> Any:
        assert self.structured is not None
        # every batch of a whole pass already matched model(x): no forward check
        if isinstance(self.structured, GraphHVP):
            return graph_primal(self.structured, self.model, self.batchnorm, x, y,
                                check_forward=not self._forward_checked, tol=verify_tolerance(self.dtype))
        return structured_primal(self.structured, self.model, self.batchnorm, x, y,
                                 check_forward=not self._forward_checked, tol=verify_tolerance(self.dtype))


class CurvatureOperator(LinearOperator):
    """A symmetric (P, P) curvature matrix of a loss w.r.t. chosen parameters (see the module doc
    of :mod:`resgeom_fast.operators.hessian`). Subclasses supply the per-batch product.

    Attributes:
        param_names: names of the chosen parameters, in the order of the vector space.
        param_shapes: their shapes; ``param_offsets[i]`` is where parameter i starts.
        num_samples: samples of the data the loss is averaged over (of every rank, when data-parallel).
        distributed: None (one process) or the data-parallel mode, "split" or "sharded"
            (:class:`CurvatureEngine`); every rank then holds the same operator.
        rank_samples: samples held by each rank (data-parallel; ``[num_samples]`` otherwise).
        hvp: the product method ("auto", "structured", "double_backward" or "forward_over_reverse").
        matmul: the matmul backend setting ("auto", "default" or "onednn").
        cached: whether per-batch graphs (and the batches) are kept between calls.
        deterministic: whether "auto" follows the fixed rule instead of timings (module doc).
        precision: "ieee" (IEEE float32 forced on CUDA during products) or "tf32" (PyTorch's
            settings as they are); see :func:`~resgeom_fast.operators.hessian.hessian`.
        loss_reduction: what the one-off check of the mean contract found: ``"mean"``,
            ``"neither mean nor sum (one batch: loss_fn as given)"`` or ``"not checked: <why>"``
            (:func:`~resgeom_fast.operators._mean_contract.check_mean_contract`).
        max_vectors_per_pass: a matmat with more columns is applied in passes of this many
            (default 10, the probes of a 10-probe SLQ; wider passes were no faster per vector on
            the benchmark ResNet, and they cost memory and longer "auto" measurements).
    """

    name: ClassVar[str] = "curvature"   # for messages

    def __init__(self, engine: CurvatureEngine, idx: list[int]) -> None:
        self._engine, self._idx = engine, idx
        self.param_names = [engine.names[i] for i in idx]
        self.param_shapes = [tuple(engine.params[i].shape) for i in idx]
        self._numels = [engine.params[i].numel() for i in idx]
        offsets, o = [], 0
        for n in self._numels:
            offsets.append(o)
            o += n
        self.param_offsets = offsets
        super().__init__((o, o), engine.dtype, engine.device, (), symmetric=True)
        self.num_samples = engine.batches.total
        self.distributed = engine.distributed
        self.rank_samples = list(engine.rank_samples)
        self.hvp, self.cached, self.matmul = engine.hvp, engine.cache, engine.matmul
        self.deterministic = engine.deterministic
        self.precision = engine.precision
        self.loss_reduction = engine.loss_reduction
        self.max_vectors_per_pass = 10

    # -- the per-batch product each curvature supplies -------------------------------------------
    @classmethod
    def structured_engine(cls, model: nn.Module, params: Sequence[Tensor], loss_fn: LossFn,
                          batchnorm: str) -> tuple[Optional[Union[StructuredHVP, GraphHVP]], str]:
        """The structured (autograd-free) product engine for this curvature, or (None, why not)."""
        return None, f"the {cls.name} has no structured path"

    @classmethod
    def _graph_engine(cls, curvature: str, model: nn.Module, params: Sequence[Tensor], loss_fn: LossFn,
                      batchnorm: str) -> tuple[Optional[GraphHVP], str]:
        loss = structured_loss(loss_fn)
        if loss is None:
            return None, ("the loss is not nn.CrossEntropyLoss() / F.cross_entropy (mean, no class weights, "
                          "no label smoothing) or nn.MSELoss() / F.mse_loss (mean)")
        graph, why = trace_graph(model, params, batchnorm)
        if graph is None:
            return None, why
        return GraphHVP(graph, params, loss=loss, curvature=curvature), ""

    def structured_flops(self, k: int) -> Optional[int]:
        """Convolution / GEMM floating-point operations of one structured product of ``k``
        vectors over the operator's data (None: the structured path is not in use, or the FC
        engine, which does not count them; counted after the first structured product, which
        sets the spatial sizes). See :meth:`~resgeom_fast.operators._structured_conv.GraphHVP.flops`."""
        eng = self._engine.structured
        if not isinstance(eng, GraphHVP) or eng.macs is None or self.structured_off is not None:
            return None
        return eng.flops(self.num_samples, k)

    @staticmethod
    def batch_graph(fn: str, model: nn.Module, loss_fn: LossFn, params: Sequence[Tensor], x: Tensor,
                    y: Any) -> Any:
        """One batch's graph for :meth:`graph_product` (called under ``enable_grad`` and the mode)."""
        raise NotImplementedError

    @staticmethod
    def graph_product(graph: Any, params: Sequence[Tensor], idx: Sequence[int], vs: Sequence[Tensor],
                      k: int) -> list[Tensor]:
        """The batch's curvature times ``vs`` (``vs[j]``: [k, *shape of params[idx[j]]])."""
        raise NotImplementedError

    @staticmethod
    def func_product(model: nn.Module, loss_fn: LossFn, names: Sequence[str], primals: tuple[Tensor, ...],
                     x: Tensor, y: Any, vs: Sequence[Tensor]) -> Sequence[Tensor]:
        """The batch's curvature times ``vs`` by torch.func (forward-over-reverse)."""
        raise NotImplementedError

    # -- LinearOperator --------------------------------------------------------------------------
    def _matmat(self, X: Tensor) -> Tensor:
        k = X.shape[-1]
        if k == 0:
            return X.new_zeros(X.shape)
        Xt = X.detach().t()                                               # [k, P]
        out: Optional[Tensor] = None
        for c0 in range(0, k, self.max_vectors_per_pass):                 # bounds memory
            Xc = Xt[c0:c0 + self.max_vectors_per_pass]
            kc = Xc.shape[0]
            vs = [Xc[:, o:o + n].reshape(kc, *s) for o, n, s in
                  zip(self.param_offsets, self._numels, self.param_shapes)]
            res = self._engine.apply(self._idx, vs, kc)
            if out is None:
                out = res[0].new_empty((k, self.shape[0]))
            # each product copied once into its place, whatever its memory layout (a reshape of
            # a channels_last weight product and a cat would copy it twice)
            for o, n, s, r in zip(self.param_offsets, self._numels, self.param_shapes, res):
                out[c0:c0 + kc, o:o + n].view(kc, *s).copy_(r)
            del res
        # [k, P] -> a [P, k] view: Lanczos reads it back transposed, so no copy is made here.
        assert out is not None
        return out.t()

    # -- what "auto" measured and chose ----------------------------------------------------------
    @property
    def hvp_timings(self) -> dict[int, dict[str, list[float]]]:
        """``"auto"`` measurements of this operator: {k: {candidate: [seconds per pass, ...]}}, a
        candidate being a method, with ``"+onednn"`` when oneDNN ran its matmuls."""
        return {k: {m: list(t) for m, t in rec.items()}
                for (idx, k), rec in self._engine.tuner.timings.items() if list(idx) == self._idx}

    def hvp_choice(self, k: int) -> Optional[str]:
        """The product method used for passes of ``k`` vectors, with ``"+onednn"`` when oneDNN runs
        its matmuls (None: ``"auto"`` still measuring)."""
        return self._engine.tuner.choice(self._idx, k)

    @property
    def hvp_method(self) -> Optional[str]:
        """The product method of every pass ("structured", "double_backward" or
        "forward_over_reverse") when it is fixed: ``hvp`` names one, ``deterministic=True``, or
        "auto" found the structured path; None while "auto" picks per pass width by timing (see
        :meth:`hvp_choice`). It can change once: when the structured path fails its first check
        (or forward-over-reverse raises under "auto"), the double backward takes over."""
        methods = {c.partition("+")[0] for c in self._engine.tuner.candidates(2)}
        return methods.pop() if len(methods) == 1 else None

    @property
    def matmul_choice(self) -> Optional[str]:
        """The matmul library of every pass ("default" or "onednn") when it is fixed (``matmul``
        names one, ``deterministic=True``, or oneDNN does not apply); None while "auto" measures."""
        libs = {c.partition("+")[2] or "default" for c in self._engine.tuner.candidates(2)}
        return libs.pop() if len(libs) == 1 else None

    @property
    def forward_over_reverse_off(self) -> Optional[str]:
        """Why ``hvp="auto"`` stopped using forward-over-reverse (it raised on this model / loss);
        None: it did not."""
        return self._engine.tuner.fwd_off

    @property
    def verification(self) -> dict[int, dict[str, float]]:
        """{k: {candidate: relative difference of its first product to the double backward's}}
        for the structured path and oneDNN candidates (module doc)."""
        return {k: dict(d) for (idx, k), d in self._engine.tuner.checks.items() if list(idx) == self._idx and d}

    @property
    def structured_off(self) -> Optional[str]:
        """Why the structured path is not used (None: it is, or ``hvp`` names another method)."""
        return self._engine.tuner.structured_off

    @property
    def onednn_off(self) -> Optional[str]:
        """Why ``matmul="auto"`` stopped using oneDNN (None: it did not)."""
        return self._engine.tuner.onednn_off

    # -- the vector space ------------------------------------------------------------------------
    def flatten(self, tensors: Union[dict[str, Tensor], Sequence[Tensor]]) -> Tensor:
        """Per-parameter tensors (a dict by name or a sequence in order), each ``[*shape]`` or
        ``[*shape, k]``, to one ``[P]`` / ``[P, k]`` tensor of the vector space."""
        if isinstance(tensors, dict):
            missing = [n for n in self.param_names if n not in tensors]
            if missing:
                raise ArgumentValueError(f"flatten: expected tensors for every parameter, missing {missing}")
            tensors = [tensors[n] for n in self.param_names]
        tensors = list(tensors)
        if len(tensors) != len(self.param_shapes):
            raise ArgumentValueError(f"flatten: expected {len(self.param_shapes)} tensors, got {len(tensors)}")
        extra = tensors[0].dim() - len(self.param_shapes[0])
        if extra not in (0, 1):
            raise ArgumentValueError(
                f"flatten: expected tensors of the parameter shapes (optionally with a trailing k), "
                f"got {tuple(tensors[0].shape)} for {self.param_shapes[0]}")
        if extra == 0:
            return torch.cat([t.reshape(-1) for t in tensors])
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """A ``[P]`` or ``[P, k]`` tensor to a dict ``name -> [*shape]`` (or ``[*shape, k]``) of views."""
        if vec.dim() not in (1, 2) or vec.shape[0] != self.shape[0]:
            raise ArgumentValueError(
                f"unflatten: expected a tensor of shape [{self.shape[0]}] or [{self.shape[0]}, k], "
                f"got {tuple(vec.shape)}")
        tail = tuple(vec.shape[1:])
        return {n: vec[o:o + m].reshape(*s, *tail) for n, o, m, s in
                zip(self.param_names, self.param_offsets, self._numels, self.param_shapes)}

    def clear_cache(self) -> None:
        """Drop the cached graphs (rebuilt on the next call); call after changing the parameters."""
        self._engine.clear_cache()


class HessianOperator(CurvatureOperator):
    """The Hessian of the mean loss (a :class:`CurvatureOperator`); structured path: the FC engine
    (:mod:`resgeom_fast.operators._structured`) on this package's FC ResNets, else the traced graph's
    (:mod:`resgeom_fast.operators._structured_conv`)."""

    name: ClassVar[str] = "Hessian"

    @classmethod
    def structured_engine(cls, model: nn.Module, params: Sequence[Tensor], loss_fn: LossFn,
                          batchnorm: str) -> tuple[Optional[Union[StructuredHVP, GraphHVP]], str]:
        """This package's FC ResNets: the FC engine; any other model: the traced graph's."""
        layers, why = parse_structured(model, params, loss_fn, batchnorm)
        if layers is not None:
            return StructuredHVP(layers, params, loss=structured_loss(loss_fn) or "ce"), ""
        engine, why_graph = cls._graph_engine("hessian", model, params, loss_fn, batchnorm)
        if engine is None and why != why_graph and not why.startswith("the model has no "):
            # a stem/blocks/pool/head network the FC engine refused: both reasons
            why_graph = f"{why}; the traced graph: {why_graph}"
        return engine, why_graph

    batch_graph = staticmethod(hessian_graph)
    graph_product = staticmethod(hessian_graph_product)
    func_product = staticmethod(hessian_func_product)


class GGNOperator(CurvatureOperator):
    """The generalised Gauss-Newton matrix ``G = mean_b J_b^T H_out,b J_b`` (a :class:`CurvatureOperator`)."""

    name: ClassVar[str] = "GGN"

    @classmethod
    def structured_engine(cls, model: nn.Module, params: Sequence[Tensor], loss_fn: LossFn,
                          batchnorm: str) -> tuple[Optional[Union[StructuredHVP, GraphHVP]], str]:
        """The traced graph's GGN engine (tangent forward, output Hessian, plain backward)."""
        return cls._graph_engine("ggn", model, params, loss_fn, batchnorm)

    batch_graph = staticmethod(ggn_graph)
    graph_product = staticmethod(ggn_graph_product)
    func_product = staticmethod(ggn_func_product)
