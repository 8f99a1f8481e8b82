"""The bottom floor: what every layer of resgeom_fast shares (imports torch and the stdlib only).

- :mod:`resgeom_fast.core.checks` -- argument checks: one message grammar
  (``"<fn>: expected <arg> <expectation>, got <actual>"``), one exception type per fault.
- :mod:`resgeom_fast.core.io` -- atomic writes (files, torch.save, text, JSON), file digests and
  JSON conversion of tensors / numpy values / dataclasses.
- :mod:`resgeom_fast.core.blocks` -- the residual-block protocol: :class:`BlockInfo`,
  ``residual_blocks`` (block kinds recognised by type, extensible with ``register_block_kind``),
  and the module types the fast paths recognise (ZeroSkip, ScalarBias, ScalarMultiplier).
- :mod:`resgeom_fast.core.modules` -- forward-hook capture (``capture_outputs`` /
  ``capture_inputs``), ``module_mode`` (restores every submodule's mode) and the one ``data``
  contract ``as_batches`` (an (x, y) batch, a list of batches, a DataLoader, a Dataset);
  ``capture_points`` (sublayer blocks' capture points) and ``attention_math`` (math SDPA kernel,
  MHA fast path off, for forward-mode AD and double backward through attention).
- :mod:`resgeom_fast.core.distributed` -- process-group helpers of the data-parallel operators:
  ``shard``, one-collective ``all_reduce_sum``, ``broadcast_object``, ``raise_together``,
  ``RankFailureError`` (docs/distributed.md).
- :mod:`resgeom_fast.core.heap` -- ``call_kept`` (every ``LinearOperator`` product) and
  ``keep_heap`` (every window of Lanczos steps): inside one scope glibc serves large host
  blocks from the heap and reuses them instead of mmapping (and page-faulting) each one
  afresh; the outermost exit restores glibc's large-block settings, copies large results out
  of the heap and, past glibc's trim threshold, schedules a trim 1 s later that the next scope
  cancels (``release`` runs it at once; ``RESGEOM_HEAP=0`` turns the scope off).
"""
from resgeom_fast.core import blocks, checks, io, modules
from resgeom_fast.core.checks import ArgumentTypeError, ArgumentValueError, NonFiniteError

__all__ = ["ArgumentTypeError", "ArgumentValueError", "NonFiniteError", "blocks", "checks", "io", "modules"]
