"""The runnable studies of ``resgeom run STUDY``, the demo of ``resgeom demo`` and ``resgeom analyze``.

Each :class:`Study` declares its options (defaults sized for a 2-core CPU in minutes; raise
width, depth, epochs, samples or pick a torchvision data set and ``device=cuda`` to scale up)
and a ``run(runner, config)`` that executes resumable steps and returns a :class:`StudyOutput`:
the results dictionary, the figures built from it and the summaries for report.md.

One module per study, registered in :data:`STUDIES` (``resgeom run``) or :data:`COMMANDS`
(subcommands with flags of their own) when imported below; the CLI reads both registries:

- alignment: ResNet with vs without skips (RA1-RA3), and RA4 across depths;
- hessian: plain vs residual vs hyper-residual Hessian spectra (degenerate / negative mass);
- singularities: the same architectures plus the plain net with BiasReg (dead units, overlaps,
  linear dependence) and their training curves;
- collapse: collapse metrics against depth, along training, and the MUFM optimum;
- expansion: remainder after the second-order terms ~ lam^3, output norm at init against depth
  for lam in {1, 1/sqrt(L), 1/L}, path-order distributions of trained nets;
- leaky: -(2/Lt) H against Lt on the teacher data (k* = 3), Hamiltonian across layers;
- demo (``resgeom demo``): every analysis on a ResNet and its plain twin;
- analyze (``resgeom analyze``): alignment per stage and the Hessian spectrum of a user's model.

Shared pieces: ``_registry`` (Study, StudyOutput, the registries), ``_shared`` (options, data,
training and analysis steps), ``_validation`` (checks before any work), ``_readings`` (the
figures' lines of text) and ``_figures`` (figure specs several studies draw).
"""
from __future__ import annotations

# the order of the imports is the order of STUDIES (``resgeom run --help``, error messages)
from . import alignment, hessian, singularities, collapse, expansion, leaky  # noqa: I001
from . import analyze, demo
from ._figures import (
    alignment_figures,
    collapse_figure,
    density_figure,
    paths_figure,
    singularity_figure,
    stage_figures,
    training_figure,
)
from ._readings import (
    CONTRAST_Z,
    CONTROL,
    EXPECTED_DEGENERACY_ORDER,
    RA1_METRICS,
    alignment_stage_reading,
    collapse_reading,
    contrast_z,
    degeneracy_order_reading,
    per_model,
    ra1_reading,
    spectrum_reading,
)
from ._registry import COMMANDS, STUDIES, Command, Study, StudyOutput, get_study, register, register_command
from ._shared import (
    ALIGN_OPTIONS,
    ARCH_CHOICES,
    ARCHS,
    DETERMINISTIC_OPTION,
    HESSIAN_OPTIONS,
    SEED_MAX,
    SPECTRUM_K_MAX,
)
from ._validation import DataInfo, data_info
from .alignment import run_alignment, validate_alignment
from .collapse import run_collapse, validate_collapse
from .demo import DEMO_SIZES, demo_config, run_demo, validate_demo
from .expansion import run_expansion, validate_expansion
from .hessian import run_hessian, validate_hessian
from .leaky import LEAKY_OPTIONS, run_leaky, validate_leaky
from .singularities import run_singularities, validate_singularities

#: the names of :data:`STUDIES` at import (the CLI reads :data:`STUDIES` itself)
STUDY_NAMES: tuple[str, ...] = tuple(STUDIES)

# the private names of the single-module studies.py, kept for callers (and tests) that use them
_align_figures = alignment_figures
_collapse_figure = collapse_figure
_density_figure = density_figure
_fig_training = training_figure
_paths_figure = paths_figure
_singularity_figure = singularity_figure
_stage_figures = stage_figures
_collapse_reading = collapse_reading
_contrast_z = contrast_z
_degeneracy_order_reading = degeneracy_order_reading
_per_model = per_model
_ra1_reading = ra1_reading
_spectrum_reading = spectrum_reading
_leaky_adam = leaky._leaky_adam

__all__ = [
    "ALIGN_OPTIONS", "ARCHS", "ARCH_CHOICES", "COMMANDS", "CONTRAST_Z", "CONTROL", "Command", "DEMO_SIZES",
    "DETERMINISTIC_OPTION", "DataInfo", "EXPECTED_DEGENERACY_ORDER", "HESSIAN_OPTIONS", "LEAKY_OPTIONS", "RA1_METRICS",
    "SEED_MAX", "SPECTRUM_K_MAX", "STUDIES", "STUDY_NAMES", "Study", "StudyOutput", "alignment", "alignment_figures",
    "alignment_stage_reading", "analyze", "collapse", "collapse_figure", "data_info", "demo", "demo_config",
    "density_figure", "expansion", "get_study", "hessian", "leaky", "paths_figure", "register", "register_command",
    "run_alignment", "run_collapse", "run_demo", "run_expansion", "run_hessian", "run_leaky", "run_singularities",
    "singularities", "singularity_figure", "stage_figures", "training_figure", "validate_alignment",
    "validate_collapse", "validate_demo", "validate_expansion", "validate_hessian", "validate_leaky",
    "validate_singularities",
]
