"""The analyses of the five studies (layer 6): operators, models and data -> result objects.

Each analysis returns a dataclass with ``to_dict()`` / ``to_json(path)`` / ``summary()`` (the
generic ``to_dict`` of :class:`~resgeom_fast.analysis._common.Result`, derived from the fields) and
has plot helpers beside it (``plot_*`` functions of the same module, returning a matplotlib Figure).
The plot helpers draw from the dict form -- the result, its ``to_dict()`` or a results.json dict
with ``at=`` the path of the result in it -- through the primitives of :mod:`.plotting` (the one
plotting path, also the reports'), so every plotted number is a number of that dict.

- :func:`residual_alignment` (alignment.py): RA1-RA4 of residual Jacobians (docs/science.md section 1).
- :func:`hessian_spectrum` (spectrum.py): extreme eigenvalues, trace, SLQ density, degeneracy and
  negative mass with intervals that cover quadrature and probe error (2).
- :func:`singularities` (singularities.py): elimination, overlap, linear dependence of units (2).
- :func:`path_expansion`, :func:`second_order_expansion`, :func:`remainder_scaling`,
  :func:`geometric_complexity`, :func:`output_norm_vs_depth` (expansion.py) (3).
- :func:`hamiltonian` (hamiltonian.py): COI, kinetic energy, H, H(A, B), bottleneck rank (4).
- :func:`collapse` (collapse.py), :func:`mufm` (mufm.py): progressive feedforward collapse (5).
- :func:`ujm` (ujm.py): the Unconstrained Jacobians Model of Residual Alignment (1).
"""
from resgeom_fast.analysis.alignment import (
    AlignmentResult,
    StageAlignment,
    depth_scaling,
    plot_cross_alignment,
    plot_sigma1,
    plot_singular_values,
    plot_trajectories,
    residual_alignment,
    trajectory_metrics,
)
from resgeom_fast.analysis.collapse import CollapseResult, collapse, collapse_metrics, plot_collapse
from resgeom_fast.analysis.expansion import (
    ExpansionResult,
    GCResult,
    PathExpansionResult,
    geometric_complexity,
    output_norm_vs_depth,
    path_expansion,
    plain_runs,
    plot_output_norms,
    plot_path_orders,
    remainder_scaling,
    second_order_expansion,
)
from resgeom_fast.analysis.hamiltonian import (
    HamiltonianResult,
    bottleneck_rank,
    hamiltonian,
    plot_hamiltonian,
    plot_layer_spectra,
)
from resgeom_fast.analysis.mufm import MUFMResult, mufm, plot_mufm
from resgeom_fast.analysis.singularities import (
    SingularityResult,
    find_activation_layers,
    plot_singularities,
    singularities,
)
from resgeom_fast.analysis.spectrum import MassFraction, SpectrumResult, hessian_spectrum, plot_density, plot_eigenvalues
from resgeom_fast.analysis.ujm import UJMResult, plot_ujm, ujm, ujm_objective

__all__ = [
    "AlignmentResult", "CollapseResult", "ExpansionResult", "GCResult", "HamiltonianResult", "MUFMResult",
    "MassFraction",
    "PathExpansionResult", "SingularityResult", "SpectrumResult", "StageAlignment", "bottleneck_rank",
    "collapse", "collapse_metrics", "depth_scaling", "geometric_complexity", "hamiltonian",
    "find_activation_layers", "hessian_spectrum", "mufm", "output_norm_vs_depth", "path_expansion", "plain_runs",
    "plot_collapse",
    "plot_cross_alignment", "plot_density", "plot_eigenvalues", "plot_hamiltonian", "plot_layer_spectra",
    "plot_mufm", "plot_output_norms", "plot_path_orders", "plot_sigma1", "plot_singular_values",
    "plot_singularities", "plot_trajectories", "remainder_scaling", "residual_alignment",
    "second_order_expansion", "singularities", "trajectory_metrics",
    "UJMResult", "plot_ujm", "ujm", "ujm_objective",
]
