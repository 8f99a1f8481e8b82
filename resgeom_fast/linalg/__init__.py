"""Matrix-free linear algebra on the LinearOperator protocol (layer 3 of DESIGN.md).

Everything is batched: an operator of batch shape (b,) holds b independent matrices, and the
algorithms advance all problems (and all probes of each) together.
"""
from resgeom_fast.linalg._memory import InsufficientMemoryError, MemoryPlan
from resgeom_fast.linalg.eigsh import EigshResult, eigsh
from resgeom_fast.linalg.lanczos import Lanczos
from resgeom_fast.linalg.operator import (
    CallableOperator,
    DenseOperator,
    LinearOperator,
    NonFiniteError,
    aslinearoperator,
)
from resgeom_fast.linalg.slq import IntervalMass, SLQResult, interval_mass, slq_density
from resgeom_fast.linalg.svd import SVDResult, randomized_svd
from resgeom_fast.linalg.trace import TraceResult, trace

__all__ = [
    "CallableOperator", "DenseOperator", "EigshResult", "InsufficientMemoryError", "IntervalMass", "Lanczos",
    "LinearOperator", "MemoryPlan", "NonFiniteError", "SLQResult", "SVDResult", "TraceResult", "aslinearoperator", "eigsh",
    "interval_mass", "randomized_svd", "slq_density", "trace",
]
