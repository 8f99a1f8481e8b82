"""The dict form of every analysis result (``Result.to_dict``, derived from the dataclass fields):
the keys, their order and nesting are those results.json and the reports read, pinned here on
one tiny instance of each result (tests/analysis/_tiny_results.py); the declared layout
(``_exclude``, ``json_field``, ``_extra``, ``_place``) on a toy result."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
import torch

from resgeom_fast.analysis._common import FIRST, Result, json_field, to_jsonable
from resgeom_fast.analysis.collapse import RANK_RULE

from ._tiny_results import tiny_results

_NO_RECURSION = ("summary", "undefined", "hvp_methods")  # checked below / keyed by data


def key_paths(x: Any, prefix: str = "") -> list[str]:
    """Every key of a nested dict in order, as dotted paths; a list of dicts is read from its
    first item (``*``); ``fractions`` from its first entry."""
    out: list[str] = []
    if isinstance(x, dict):
        for k, v in x.items():
            q = f"{prefix}{k}"
            out.append(q)
            if k in _NO_RECURSION:
                continue
            if k == "fractions" and isinstance(v, dict) and v:
                first = next(iter(v))
                out += [f"{q}.{n}" for n in v] + [f"{q}.{first}." + s for s in key_paths(v[first])]
                continue
            out += key_paths(v, q + ".")
    elif isinstance(x, list) and x and isinstance(x[0], dict):
        out += key_paths(x[0], prefix + "*.")
    return out


KEYS: dict[str, Optional[list[str]]] = {
    "alignment": (
        "analysis settings settings.num_classes settings.num_classes_source settings.k settings.oversample "
        "settings.power_iters settings.tol settings.max_iters settings.tau settings.seed settings.path "
        "settings.n_samples settings.per_stage settings.deterministic accuracy accuracy.tol accuracy.adaptive "
        "accuracy.max_iters accuracy.all_converged accuracy.converged_fraction accuracy.max_rel_error_bound "
        "accuracy.max_error_bound_sigma1 accuracy.iterations_max labels skipped_blocks stages stages.*.stage "
        "stages.*.block_names stages.*.block_indices stages.*.shape stages.*.dim stages.*.k "
        "stages.*.num_blocks stages.*.ra1 stages.*.ra1.linearity stages.*.ra1.equispacing "
        "stages.*.ra1.step_cosine stages.*.ra1.linearity_mean stages.*.ra1.linearity_std "
        "stages.*.ra1.equispacing_mean stages.*.ra1.equispacing_std stages.*.ra1.step_cosine_mean "
        "stages.*.ra1.step_cosine_std stages.*.ra1.pca stages.*.ra1.pca_explained stages.*.ra2 "
        "stages.*.ra2.self_alignment_mean stages.*.ra2.self_alignment_std stages.*.ra2.self_alignment_r "
        "stages.*.ra2.self_alignment_per_r stages.*.ra2.diag_ratio_mean stages.*.ra2.diag_ratio_std "
        "stages.*.ra2.diag_ratio_offdiag stages.*.ra2.diag_positive stages.*.ra2.diag_positive_offdiag "
        "stages.*.ra2.random_baseline stages.*.ra2.cross_pairs stages.*.ra2.cross_abs_mean "
        "stages.*.ra2.cross_diag_mean stages.*.ra3 stages.*.ra3.singular_values_mean "
        "stages.*.ra3.singular_values_std stages.*.ra3.rank_mean stages.*.ra3.rank_std stages.*.ra3.rank_min "
        "stages.*.ra3.rank_max stages.*.ra3.rank_le_c stages.*.ra3.rank_cap stages.*.ra3.rank_capped "
        "stages.*.ra3.rank_note stages.*.ra3.gap_ratio_mean stages.*.ra3.gap_ratio_std stages.*.ra4 "
        "stages.*.ra4.sigma1_mean stages.*.ra4.sigma1_std stages.*.ra4.depth_product "
        "stages.*.ra4.depth_product_excl_first stages.*.ra4.first_block_ratio stages.*.svd "
        "stages.*.svd.iterations stages.*.svd.converged_fraction stages.*.svd.max_rel_error_bound "
        "stages.*.svd.max_error_bound_sigma1 stages.*.undefined stages.*.summary summary "
    ).split(),
    "alignment_conv": None,  # as alignment
    "alignment_one_block": (
        "analysis settings settings.num_classes settings.num_classes_source settings.k settings.oversample "
        "settings.power_iters settings.tol settings.max_iters settings.tau settings.seed settings.path "
        "settings.n_samples settings.per_stage settings.deterministic accuracy accuracy.tol accuracy.adaptive "
        "accuracy.max_iters accuracy.all_converged accuracy.converged_fraction accuracy.max_rel_error_bound "
        "accuracy.max_error_bound_sigma1 accuracy.iterations_max labels skipped_blocks stages stages.*.stage "
        "stages.*.block_names stages.*.block_indices stages.*.shape stages.*.dim stages.*.k "
        "stages.*.num_blocks stages.*.ra1 stages.*.ra1.linearity stages.*.ra1.equispacing "
        "stages.*.ra1.step_cosine stages.*.ra1.linearity_mean stages.*.ra1.linearity_std "
        "stages.*.ra1.equispacing_mean stages.*.ra1.equispacing_std stages.*.ra1.step_cosine_mean "
        "stages.*.ra1.step_cosine_std stages.*.ra1.undefined_reason stages.*.ra1.pca "
        "stages.*.ra1.pca_explained stages.*.ra2 stages.*.ra2.self_alignment_mean "
        "stages.*.ra2.self_alignment_std stages.*.ra2.self_alignment_r stages.*.ra2.self_alignment_per_r "
        "stages.*.ra2.diag_ratio_mean stages.*.ra2.diag_ratio_std stages.*.ra2.diag_ratio_offdiag "
        "stages.*.ra2.diag_positive stages.*.ra2.diag_positive_offdiag stages.*.ra2.random_baseline "
        "stages.*.ra2.cross_pairs stages.*.ra2.cross_abs_mean stages.*.ra2.cross_diag_mean stages.*.ra3 "
        "stages.*.ra3.singular_values_mean stages.*.ra3.singular_values_std stages.*.ra3.rank_mean "
        "stages.*.ra3.rank_std stages.*.ra3.rank_min stages.*.ra3.rank_max stages.*.ra3.rank_le_c "
        "stages.*.ra3.rank_cap stages.*.ra3.rank_capped stages.*.ra3.rank_note stages.*.ra3.gap_ratio_mean "
        "stages.*.ra3.gap_ratio_std stages.*.ra4 stages.*.ra4.sigma1_mean stages.*.ra4.sigma1_std "
        "stages.*.ra4.depth_product stages.*.ra4.depth_product_excl_first stages.*.ra4.first_block_ratio "
        "stages.*.svd stages.*.svd.iterations stages.*.svd.converged_fraction "
        "stages.*.svd.max_rel_error_bound stages.*.svd.max_error_bound_sigma1 stages.*.undefined "
        "stages.*.summary summary "
    ).split(),
    "collapse": (
        "layers widths nc1 etf_error equinorm ncc_mismatch tr_sigma_w tr_sigma_b rank_sigma_b "
        "sigma_b_condition ill_conditioned nc1_note feature_dtype rank_rule nc3 nc3_note spearman "
        "spearman.nc1 spearman.etf_error spearman.equinorm spearman.ncc_mismatch spearman_note "
        "spearman_note.nc1 spearman_note.etf_error spearman_note.equinorm spearman_note.ncc_mismatch "
        "ncc_zero_from num_classes num_samples class_counts pool split tokens "
    ).split(),
    "spectrum": (
        "name dim eigenvalues residuals converged lanczos_steps lambda_max lambda_min trace trace_stderr "
        "trace_method nodes weights grid density density_std moments moments_std sigma slq_steps threshold "
        "degeneracy_fraction degeneracy_stderr negative_fraction negative_stderr "
        "significant_negative_fraction significant_negative_stderr abs_threshold degeneracy_fraction_abs "
        "degeneracy_abs_stderr fractions fractions.degenerate_rel fractions.degenerate_abs fractions.negative "
        "fractions.significant_negative fractions.degenerate_rel.name fractions.degenerate_rel.interval "
        "fractions.degenerate_rel.steps fractions.degenerate_rel.probes fractions.degenerate_rel.value "
        "fractions.degenerate_rel.stderr fractions.degenerate_rel.quadrature_lower "
        "fractions.degenerate_rel.quadrature_upper fractions.degenerate_rel.lower "
        "fractions.degenerate_rel.upper fractions.degenerate_rel.resolved fractions.degenerate_rel.half_steps "
        "fractions.degenerate_rel.half_value fractions.degenerate_rel.half_lower "
        "fractions.degenerate_rel.half_upper fractions.degenerate_rel.note unresolved k_used notes operator "
        "batchnorm num_samples param_names eps abs_eps max_bracket k probes steps trace_probes sigma0 seed "
        "hvp deterministic hvp_methods products blocks blocks.*.name blocks.*.dim blocks.*.eigenvalues "
        "blocks.*.residuals blocks.*.converged blocks.*.lanczos_steps blocks.*.lambda_max blocks.*.lambda_min "
        "blocks.*.trace blocks.*.trace_stderr blocks.*.trace_method blocks.*.nodes blocks.*.weights "
        "blocks.*.grid blocks.*.density blocks.*.density_std blocks.*.moments blocks.*.moments_std "
        "blocks.*.sigma blocks.*.slq_steps blocks.*.threshold blocks.*.degeneracy_fraction "
        "blocks.*.degeneracy_stderr blocks.*.negative_fraction blocks.*.negative_stderr "
        "blocks.*.significant_negative_fraction blocks.*.significant_negative_stderr blocks.*.abs_threshold "
        "blocks.*.degeneracy_fraction_abs blocks.*.degeneracy_abs_stderr blocks.*.fractions "
        "blocks.*.fractions.degenerate_rel blocks.*.fractions.degenerate_abs blocks.*.fractions.negative "
        "blocks.*.fractions.significant_negative blocks.*.fractions.degenerate_rel.name "
        "blocks.*.fractions.degenerate_rel.interval blocks.*.fractions.degenerate_rel.steps "
        "blocks.*.fractions.degenerate_rel.probes blocks.*.fractions.degenerate_rel.value "
        "blocks.*.fractions.degenerate_rel.stderr blocks.*.fractions.degenerate_rel.quadrature_lower "
        "blocks.*.fractions.degenerate_rel.quadrature_upper blocks.*.fractions.degenerate_rel.lower "
        "blocks.*.fractions.degenerate_rel.upper blocks.*.fractions.degenerate_rel.resolved "
        "blocks.*.fractions.degenerate_rel.half_steps blocks.*.fractions.degenerate_rel.half_value "
        "blocks.*.fractions.degenerate_rel.half_lower blocks.*.fractions.degenerate_rel.half_upper "
        "blocks.*.fractions.degenerate_rel.note blocks.*.unresolved blocks.*.k_used blocks.*.notes "
    ).split(),
    "singularities": (
        "eps dead_tol layers layers.*.name layers.*.module_name layers.*.call layers.*.activation "
        "layers.*.dead_rule layers.*.weight_name layers.*.weight_reason layers.*.role layers.*.block "
        "layers.*.kind layers.*.unit_dim layers.*.n_units layers.*.n_in layers.*.observations "
        "layers.*.dead_units layers.*.dead_fraction layers.*.weight_norms layers.*.small_weight_fraction "
        "layers.*.weight_units_used layers.*.weight_cos_max layers.*.weight_cos_mean "
        "layers.*.weight_pairs_above layers.*.act_units_used layers.*.act_cos_max layers.*.act_cos_mean "
        "layers.*.act_pairs_above layers.*.cov_eigenvalues layers.*.participation_ratio "
        "layers.*.effective_rank layers.*.effective_rank_fraction layers.*.small_eig_fraction means "
        "means.dead_fraction means.small_weight_fraction means.weight_cos_max means.weight_cos_mean "
        "means.act_cos_max means.act_cos_mean means.participation_ratio means.effective_rank "
        "means.effective_rank_fraction means.small_eig_fraction total_units total_dead post_means "
        "post_means.dead_fraction post_means.small_weight_fraction post_means.weight_cos_max "
        "post_means.weight_cos_mean post_means.act_cos_max post_means.act_cos_mean "
        "post_means.participation_ratio post_means.effective_rank post_means.effective_rank_fraction "
        "post_means.small_eig_fraction post_total_units post_total_dead num_samples "
    ).split(),
    "path_expansion": (
        "orders norms_mean norms_std distribution distribution_std mean_order mean_order_std total_norm_mean "
        "tail_norm_mean input_norm_mean num_blocks max_order num_samples num_probes seed block_names scales "
        "skips posts in_shape out_shape num_undefined note "
    ).split(),
    "second_order_expansion": (
        "delta_norm remainder1 remainder2 first_term_norm second_term_norm delta_mean remainder1_mean "
        "remainder2_mean scales lam num_blocks num_samples "
    ).split(),
    "geometric_complexity": (
        "gc std sem min max per_class num_samples num_outputs input_dim "
    ).split(),
    "hamiltonian": (
        "analysis leak lam gamma0 tol n_samples width depth rho time gamma k_norm coi potential stable_rank "
        "frobenius rank singular_values velocity_norm kinetic hamiltonian k_star momentum_norm hamiltonian_ab "
        "middle lu_fallbacks summary "
    ).split(),
    "bottleneck_rank": (
        "rel rank rank_middle stable_rank_middle k_star_middle "
    ).split(),
    "mufm": (
        "depth layers nc1 etf_error equinorm ncc_mismatch nc3 nc1_note input_metrics input_metrics.nc1 "
        "input_metrics.etf_error input_metrics.equinorm input_metrics.ncc_mismatch input_metrics.nc3 "
        "input_metrics.nc3_note input_metrics.tr_sigma_w input_metrics.tr_sigma_b input_metrics.rank_sigma_b "
        "input_metrics.sigma_b_condition input_metrics.sigma_b_tol input_metrics.ill_conditioned "
        "input_metrics.nc1_note input_metrics.feature_eps input_metrics.width input_metrics.num_samples "
        "spearman spearman.nc1 spearman.etf_error spearman.equinorm spearman.ncc_mismatch spearman_note "
        "spearman_note.nc1 spearman_note.etf_error spearman_note.equinorm spearman_note.ncc_mismatch "
        "ncc_zero_from loss_history grad_norm steps_run converged lam_W lam_H lr seed num_classes num_samples "
        "width "
    ).split(),
}


def _keys(name: str) -> list[str]:
    want = KEYS[name]
    return want if want is not None else KEYS[name.split("_")[0]]


@pytest.mark.parametrize("name", list(KEYS))
def test_keys_order_and_nesting(name: str) -> None:
    r = tiny_results()[name]
    d = r.to_dict()
    assert key_paths(d) == _keys(name)
    json.dumps(d, allow_nan=False)              # strict JSON: NaN -> None
    assert to_jsonable(d) == d                  # already plain Python


@pytest.mark.parametrize("name", [n for n in KEYS if "summary" in _keys(n)])
def test_summary_inside_the_dict(name: str) -> None:
    r = tiny_results()[name]
    assert r.to_dict()["summary"] == to_jsonable(r.summary())


def test_derived_and_excluded_values() -> None:
    res = tiny_results()
    al = res["alignment"].to_dict()
    st = res["alignment"].stages[0]
    s0 = al["stages"][0]
    assert al["analysis"] == "residual_alignment" and s0["num_blocks"] == 3
    assert s0["ra2"]["random_baseline"] == 1.0 / st.k and s0["svd"]["iterations"] == st.svd_iterations
    assert "num_classes" not in s0 and al["settings"]["num_classes"] == 3
    one = res["alignment_one_block"].to_dict()["stages"][0]["ra1"]
    assert one["linearity"] is None and one["step_cosine_std"] is None and "one block" in one["undefined_reason"]
    assert res["collapse"].to_dict()["rank_rule"] == RANK_RULE
    assert res["hamiltonian"].to_dict()["analysis"] == "hamiltonian"
    assert "norms" not in res["path_expansion"].to_dict()
    assert "H" not in res["mufm"].to_dict() and "W" not in res["mufm"].to_dict()
    sp = res["spectrum"]
    d = sp.to_dict()
    assert d["lambda_max"] == sp.lambda_max and d["unresolved"] == sp.unresolved
    assert d["blocks"][0] == sp.blocks[0].to_dict()
    assert d["fractions"]["negative"] == sp.fractions["negative"].to_dict()
    assert res["singularities"].to_dict()["layers"][0] == res["singularities"].layers[0].to_dict()


# -- the declared layout on a toy result ---------------------------------------------------------
@dataclass(kw_only=True)
class _Toy(Result):
    a: int
    t: torch.Tensor = json_field(group="g")
    b: float = json_field(group="g", key="bee")
    c: Optional[float] = None
    hidden: list[int] = field(default_factory=list)

    _exclude = ("hidden",)
    _place = {"first": FIRST, "g.mid": "t", "after_a": "a"}

    def _extra(self) -> dict[str, Any]:
        return {"first": 0, "g.mid": "m", "after_a": 1, "c": "replaced", "last": [math.nan]}


def test_declared_layout() -> None:
    toy = _Toy(a=1, t=torch.tensor([1.0, math.inf]), b=2.5, hidden=[1])
    d = toy.to_dict()
    assert d == {"first": 0, "a": 1, "after_a": 1, "g": {"t": [1.0, None], "mid": "m", "bee": 2.5},
                 "c": "replaced", "last": [None]}
    assert list(d) == ["first", "a", "after_a", "g", "c", "last"] and list(d["g"]) == ["t", "mid", "bee"]


def test_to_json_writes_the_dict(tmp_path) -> None:
    r = tiny_results()["geometric_complexity"]
    r.to_json(tmp_path / "gc.json")
    assert json.loads((tmp_path / "gc.json").read_text()) == r.to_dict()
