"""``resgeom run hessian``: plain vs residual vs hyper-residual Hessian spectra (SLQ density,
extreme eigenvalues, trace; degenerate and negative mass)."""
from __future__ import annotations

from typing import Any

from ..common import resolve_device
from ..figures import bars, new_figure
from ..report import FigureSpec
from ..runner import Runner
from ._figures import density_figure, training_figure
from ._readings import degeneracy_order_reading
from ._registry import Study, StudyOutput, register
from ._shared import HESSIAN_OPTIONS, arch_option, net_options, parse_archs, spectrum_step, study_data, train_net
from ._validation import validate_hessian_options, validate_net_study

__all__ = ["STUDY", "run_hessian", "validate_hessian"]


def run_hessian(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    """Train each net of ``archs`` and compute its Hessian spectrum (step ``<arch>_spectrum``)."""
    device = resolve_device(cfg["device"])
    ds, key = study_data(cfg)
    archs = parse_archs(cfg)
    models: dict[str, Any] = {}
    for arch in archs:
        model, curves = train_net(runner, cfg, ds, key, arch, device)
        models[arch] = {"train": curves, "spectrum": spectrum_step(runner, cfg, model, ds, device, f"{arch}_spectrum")}

    def bars_build(r: dict) -> Any:
        fig, axes = new_figure(2)
        bars(axes[0], r, archs, [
            ("near-zero mass, |lambda| < eps lambda_max", "models.{g}.spectrum.summary.degenerate_fraction_rel"),
            ("near-zero mass, |lambda| < abs_eps", "models.{g}.spectrum.summary.degenerate_fraction_abs"),
            ("negative mass (lambda < -eps lambda_max)", "models.{g}.spectrum.summary.significant_negative_fraction")],
             title="Hessian spectral mass (n/a: unresolved)", ylabel="fraction of the spectrum")
        bars(axes[1], r, archs, [("lambda_max", "models.{g}.spectrum.summary.lambda_max")],
             title="largest Hessian eigenvalue", ylabel="lambda_max", logy=True)
        fig.tight_layout()
        return fig

    def bars_read(r: dict) -> str:
        return degeneracy_order_reading(r, archs)

    figures = [density_figure(archs), FigureSpec("hessian_mass", "Degenerate and negative mass", bars_build, bars_read),
               training_figure(archs)]
    summaries = {a: {"spectrum": models[a]["spectrum"]["summary"]} for a in archs}
    return StudyOutput({"study": "hessian", "config": cfg, "models": models}, figures, summaries,
                       "Hessian spectra (SLQ density, extreme eigenvalues, trace) of " + ", ".join(archs) + " nets.")


def validate_hessian(cfg: dict[str, Any]) -> None:
    """hessian: the data, archs, the nets' size (with the Lanczos basis), eigs and lanczos_steps <= P,
    hessian_samples <= training samples."""
    archs = parse_archs(cfg)
    info = validate_net_study(cfg, extra_bytes_per_param=8 * cfg["lanczos_steps"])
    validate_hessian_options(cfg, info, archs)


STUDY = register(Study("hessian", "Hessian spectra: plain vs residual vs hyper-residual",
                       "near-zero Hessian mass plain >= residual >= hyper-residual",
                       net_options(depth=8) + HESSIAN_OPTIONS + [arch_option("plain,residual,hyper")], run_hessian,
                       validate_hessian))
