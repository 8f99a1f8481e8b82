"""``resgeom run alignment``: Residual Alignment (RA1-RA3) of a ResNet with vs without skips,
and RA4 across depths. The pattern of a study module: a ``run`` that executes resumable steps and
returns a :class:`StudyOutput`, a ``validate`` that refuses a configuration before any work, and a
:class:`Study` passed to :func:`register`.
"""
from __future__ import annotations

from typing import Any

from ..common import resolve_device
from ..runner import Runner
from ._figures import alignment_figures, training_figure
from ._registry import Study, StudyOutput, register
from ._shared import ALIGN_OPTIONS, alignment_step, depth_scaling_step, net_options, study_data, train_net
from ._validation import validate_alignment_options, validate_net_study

__all__ = ["STUDY", "run_alignment", "validate_alignment"]


def run_alignment(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    """Train the residual net and its plain twin, align both (RA1-RA3), then RA4 across ``depths``."""
    device = resolve_device(cfg["device"])
    ds, key = study_data(cfg)
    models: dict[str, Any] = {}
    for arch in ("residual", "plain"):
        model, curves = train_net(runner, cfg, ds, key, arch, device)
        models[arch] = {"train": curves, "alignment": alignment_step(runner, cfg, model, ds, device, f"{arch}_alignment")}
    results = {"study": "alignment", "config": cfg, "models": models,
               "depth_scaling": depth_scaling_step(runner, cfg, ds, key, device)}
    names = ["residual", "plain"]
    summaries = {m: {"alignment": models[m]["alignment"]["summary"]} for m in names}
    return StudyOutput(results, alignment_figures(names) + [training_figure(names)], summaries,
                       "Residual Alignment (RA1-RA4) of a ResNet and of the same net without skips.")


def validate_alignment(cfg: dict[str, Any]) -> None:
    """alignment: the data, the nets' size, k <= D, align_samples <= test samples."""
    info = validate_net_study(cfg)
    validate_alignment_options(cfg, info)


STUDY = register(Study("alignment", "Residual Alignment: with vs without skips",
                       "nets with skips show RA1-RA4; the same nets without skips show none",
                       net_options(epochs=30, weight_decay=5e-2, schedule="cosine") + ALIGN_OPTIONS,
                       run_alignment, validate_alignment))
