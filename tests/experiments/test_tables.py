"""CSV tables of analyze's results (issue 14): tidy rows on a constructed results dict, and the
alignment.csv / hessian.csv that ``resgeom analyze`` writes next to results.json (every number
equal to results.json's, rewritten when the results change, a stale table removed)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re

import pytest

from resgeom_fast.cli import main
from resgeom_fast.experiments.tables import COLUMNS, analysis_tables, format_value, rows_to_csv, write_tables
from resgeom_fast.experiments.tables import DOCUMENTED_REASONS


def _results() -> dict:
    stage0 = {"stage": 0, "block_names": ["layer1.0", "layer1.1"], "num_blocks": 2,
              "ra1": {"linearity": [0.5, 0.25], "linearity_mean": 0.375},
              "ra2": {"self_alignment_mean": [0.1, 0.2], "self_alignment_per_r": [[0.3, 0.4], [0.5, 0.6]]},
              "ra3": {"singular_values_mean": [[3.0, 1.0], [2.0, 0.5]], "rank_min": [2, 1],
                      "gap_ratio_mean": None},
              "ra4": {"sigma1_mean": [3.0, 2.0], "depth_product": 5.0},
              "svd": {"iterations": [0, 1], "converged_fraction": [1.0, 0.5]},
              "undefined": {"gap_ratio_mean": "k <= C"},
              "summary": {"linearity": 0.375, "max_numerical_rank": None,
                          "max_numerical_rank_reason": "capped at k = 2", "svd_converged": False}}
    stage1 = {"stage": 1, "block_names": ["layer2.1"], "num_blocks": 1, "ra4": {"sigma1_mean": [0.1 + 0.2]},
              "summary": {"linearity": None, "linearity_reason": "one block"}}
    return {"study": "analyze", "models": {"model": {
        "alignment": {"result": {"stages": [stage0, stage1]},
                      "summary": {"linearity": 0.375, "linearity_reason": "mean over stages [0]", "num_stages": 2.0,
                                  "svd_converged": True, "rank_note": "a text"}},
        "spectrum": {"result": {"eigenvalues": [-0.5, 1e-300], "residuals": [1e-5, 2e-6], "dim": 42,
                                "negative_fraction": 0.64},
                     "summary": {"lambda_max": 1e-300, "negative_fraction": None,
                                 "negative_fraction_reason": "unresolved at steps=4", "negative_fraction_lower": 0.0}}}}}


def _parse(text: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows and tuple(rows[0]) == COLUMNS
    return rows


def test_format_value_round_trips():
    for v in (0.1 + 0.2, 1e-300, -2.5e17, 1 / 3):
        assert float(format_value(v)) == v
    assert format_value(None) == "" and format_value(True) == "1" and format_value(7) == "7"
    with pytest.raises(TypeError):
        format_value("x")


def test_constructed_results_rows():
    tables = analysis_tables(_results())
    assert set(tables) == {"alignment.csv", "hessian.csv"}
    al = _parse(rows_to_csv(tables["alignment.csv"]))
    key = {(r["scope"], r["stage"], r["block"], r["metric"]): (r["value"], r["reason"]) for r in al}
    assert len(key) == len(al)  # one row per (scope, stage, block, metric)
    assert key[("model", "", "", "linearity")] == ("0.375", "mean over stages [0]")
    assert key[("model", "", "", "svd_converged")] == ("1", "")
    assert ("model", "", "", "rank_note") not in key and ("model", "", "", "linearity_reason") not in key
    assert key[("stage", "0", "", "max_numerical_rank")] == ("", "capped at k = 2")
    assert key[("stage", "1", "", "linearity")] == ("", "one block")
    assert key[("block", "0", "layer1.1", "ra2.self_alignment_mean")] == ("0.2", "")
    assert key[("block", "0", "layer1.0", "ra3.singular_values_mean[1]")] == ("1.0", "")
    assert key[("block", "0", "layer1.1", "ra2.self_alignment_per_r[0]")] == ("0.5", "")
    assert key[("block", "0", "layer1.1", "ra3.rank_min")] == ("1", "")
    assert key[("block", "0", "layer1.0", "ra3.gap_ratio_mean")] == ("", "k <= C")
    assert key[("block", "0", "layer1.1", "svd.iterations")] == ("1", "")
    assert float(key[("block", "1", "layer2.1", "ra4.sigma1_mean")][0]) == 0.1 + 0.2
    # per-sample RA1 lists and stage scalars outside the summary are not block rows
    assert not any(r["metric"].startswith("ra1.") or r["metric"] == "ra4.depth_product" for r in al)
    assert {r["block_index"] for r in al if r["block"] == "layer1.1"} == {"1"}
    hs = _parse(rows_to_csv(tables["hessian.csv"]))
    hkey = {r["metric"]: (r["value"], r["reason"]) for r in hs}
    assert hkey["negative_fraction"] == ("", "unresolved at steps=4")  # never the raw unresolved 0.64
    assert "0.64" not in rows_to_csv(tables["hessian.csv"])
    assert float(hkey["lambda_max"][0]) == 1e-300 and hkey["dim"] == ("42", "")
    assert hkey["eigenvalues[0]"] == ("-0.5", "") and float(hkey["residuals[1]"][0]) == 2e-6
    assert {r["analysis"] for r in hs} == {"hessian"} and {r["model"] for r in hs} == {"model"}


def test_write_tables_atomic_and_rewritten(tmp_path):
    res = _results()
    paths = write_tables(str(tmp_path), res)
    assert sorted(os.path.basename(p) for p in paths) == ["alignment.csv", "hessian.csv"]
    res["models"]["model"]["spectrum"]["summary"]["lambda_max"] = 2.5
    write_tables(str(tmp_path), res)
    rows = _parse((tmp_path / "hessian.csv").read_text())
    assert [r["value"] for r in rows if r["metric"] == "lambda_max"] == ["2.5"]
    assert sorted(os.listdir(tmp_path)) == ["alignment.csv", "hessian.csv"]  # no temporary files left


def _lookup(res: dict, row: dict):
    """The number of results.json a CSV row stands for."""
    entry = res["models"][row["model"]]["alignment" if row["analysis"] == "alignment" else "spectrum"]
    if row["analysis"] == "hessian":
        m = re.fullmatch(r"(eigenvalues|residuals)\[(\d+)\]", row["metric"])
        if m:
            return entry["result"][m.group(1)][int(m.group(2))]
        return entry["result"]["dim"] if row["metric"] == "dim" else entry["summary"][row["metric"]]
    if row["scope"] == "model":
        return entry["summary"][row["metric"]]
    stage = entry["result"]["stages"][int(row["stage"])]
    if row["scope"] == "stage":
        return stage["summary"][row["metric"]]
    assert stage["block_names"][int(row["block_index"])] == row["block"]
    m = re.fullmatch(r"(\w+)\.(\w+)(?:\[(\d+)\])?", row["metric"])
    v = stage[m.group(1)][m.group(2)]
    v = v[int(row["block_index"])] if v is not None else None
    return v[int(m.group(3))] if m.group(3) is not None else v


def _check_against_json(out: str) -> dict:
    res = json.load(open(os.path.join(out, "results.json")))
    counts = {}
    for fname in ("alignment.csv", "hessian.csv"):
        with open(os.path.join(out, fname), newline="") as fh:
            rows = _parse(fh.read())
        counts[fname] = len(rows)
        # and every summary number of results.json has its row (nothing left out)
        entry = res["models"]["model"]["alignment" if fname == "alignment.csv" else "spectrum"]
        summaries = [("model", "", entry["summary"])] + [("stage", str(st["stage"]), st["summary"])
                                                         for st in entry["result"].get("stages", [])]
        have = {(r["scope"], r["stage"], r["metric"]) for r in rows}
        for scope, stage, summary in summaries:
            for k, v in summary.items():
                if not k.endswith("_reason") and (v is None or isinstance(v, (bool, int, float))):
                    assert (scope, stage, k) in have, (fname, scope, stage, k)
        if fname == "alignment.csv":
            for st in entry["result"]["stages"]:
                blocks = {r["block"] for r in rows if r["metric"] == "ra4.sigma1_mean" and r["stage"] == str(st["stage"])}
                assert blocks == set(st["block_names"])
        for row in rows:
            want = _lookup(res, row)
            if want is None:
                assert row["value"] == "", row
            elif isinstance(want, bool):
                assert row["value"] == ("1" if want else "0"), row
            else:
                got = float(row["value"])
                assert got == want and math.isfinite(got), (row, want)
        # every reason in the CSV is results.json's text, or the analysis' documented rule for a
        # per-block value results.json leaves None without one (tables.DOCUMENTED_REASONS)
        for row in rows:
            assert not row["reason"] or row["reason"] in json.dumps(res) or row["reason"] in DOCUMENTED_REASONS.values(), row
    return counts


def test_analyze_writes_csvs_equal_to_results_json(tmp_path):
    out = str(tmp_path / "an")
    argv = ["analyze", "--model", "torchvision:resnet18", "--data", "random-cifar", "--samples", "2", "--batch", "2",
            "--k", "2", "--power-iters", "0", "--oversample", "2", "--probes", "1", "--steps", "3", "--trace-probes",
            "3", "--params", "fc", "--out", out, "--quiet"]
    assert main(argv) == 0
    counts = _check_against_json(out)
    assert counts["alignment.csv"] > 50 and counts["hessian.csv"] > 5
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["models"]["model"]["spectrum"]["summary"]["negative_fraction"] is None  # unresolved at 3 steps
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert {"alignment.csv", "hessian.csv"} <= set(manifest["written"])
    # other results (another seed): the tables are rewritten with them
    before = open(os.path.join(out, "hessian.csv")).read()
    assert main(argv[:-3] + ["--seed", "1", "--out", out, "--quiet"]) == 0
    assert open(os.path.join(out, "hessian.csv")).read() != before
    _check_against_json(out)
    # hessian only: the alignment table of the earlier run is removed (results.json no longer has it)
    assert main(argv[:-3] + ["--analyses", "hessian", "--out", out, "--quiet"]) == 0
    assert not os.path.exists(os.path.join(out, "alignment.csv"))
    assert os.path.isfile(os.path.join(out, "hessian.csv"))


def _more_results() -> dict:
    """Constructed collapse / singularities / expansion entries as analyze stores them."""
    collapse = {"result": {"layers": [0, 2], "widths": [4, 8], "nc1": [0.5, None], "etf_error": [0.25, None],
                           "equinorm": [0.1, 0.2], "ncc_mismatch": [0.5, 0.0], "tr_sigma_w": [1.0, 2.0],
                           "tr_sigma_b": [3.0, 4.0], "rank_sigma_b": [1, 0], "sigma_b_condition": [2.0, None],
                           "ill_conditioned": [False, True], "nc1_note": ["", "class means coincide"],
                           "nc3": None, "nc3_note": "no head", "spearman": {"nc1": None},
                           "spearman_note": {"nc1": "undefined at some layer"}},
                "summary": {"nc1_first": 0.5, "nc1_last": None, "nc3": None, "spearman_nc1": None,
                            "ill_conditioned_layers": 1.0},
                "block_names": ["b0", "b1", "b2"]}
    branch = {"name": "b0.relu#0", "module_name": "b0.relu", "call": 0, "activation": "ReLU", "dead_rule": "zero",
              "weight_name": "b0.conv", "weight_reason": None, "role": "branch", "block": 0, "kind": "conv",
              "n_units": 4, "n_in": 9, "observations": 32, "dead_units": [1], "dead_fraction": 0.25,
              "weight_norms": [1.0, 2.0, 3.0, 4.0], "small_weight_fraction": 0.0, "weight_cos_max": 0.5,
              "act_units_used": 1, "act_cos_max": None, "cov_eigenvalues": [2.0, 1.0, 0.0, 0.0],
              "participation_ratio": 1.8}
    post = dict(branch, name="b0.relu#1", call=1, role="post", weight_name=None, n_in=None, weight_norms=None,
                weight_reason="applied after the residual sum: no single incoming weight", small_weight_fraction=None,
                weight_cos_max=None, act_units_used=4, act_cos_max=0.75, dead_fraction=0.0)
    sing = {"result": {"eps": 1e-3, "layers": [branch, post], "means": {"dead_fraction": 0.25, "act_cos_max": None},
                       "post_means": {"weight_cos_max": None, "dead_fraction": 0.0}, "total_units": 4,
                       "total_dead": 1, "post_total_units": 4, "post_total_dead": 0, "num_samples": 8},
            "summary": {"dead_fraction_total": 0.25, "mean_act_cos_max": None}}
    run = {"blocks": ["b1", "b2"], "block_indices": [1, 2],
           "result": {"orders": [0, 1, 2], "norms_mean": [0.5, 0.25, 0.125], "norms_std": [0.0, 0.0, 0.0],
                      "distribution": [0.5, 0.3, 0.2], "distribution_std": [0.0, 0.1, 0.1], "mean_order": 0.7,
                      "mean_order_std": 0.1, "total_norm_mean": 0.6, "tail_norm_mean": 0.0, "input_norm_mean": 1.0,
                      "num_blocks": 2, "max_order": 2, "num_samples": 3, "num_probes": 1, "num_undefined": 1,
                      "note": "1 of 3 samples x probes have every c_L^(m) = 0"},
           "summary": {"mean_order": 0.7, "mode_order": 0.0, "tail_rel": 0.0, "num_blocks": 2.0}}
    return {"models": {"model": {"collapse": collapse, "singularities": sing,
                                 "expansion": {"runs": [run], "summary": {"num_runs": 1.0, "run0_mean_order": 0.7}}}}}


def test_constructed_collapse_singularities_expansion_rows():
    tables = analysis_tables(_more_results())
    assert set(tables) == {"collapse.csv", "singularities.csv", "expansion.csv"}
    rows = {f: _parse(rows_to_csv(t)) for f, t in tables.items()}
    for f, rs in rows.items():
        keys = [(r["scope"], r["stage"], r["layer"], r["metric"]) for r in rs]
        assert len(set(keys)) == len(keys), f                      # one row per (scope, stage, layer, metric)
    co = {(r["scope"], r["layer"], r["metric"]): r for r in rows["collapse.csv"]}
    assert co[("model", "", "nc1_last")]["value"] == "" and co[("model", "", "nc1_last")]["reason"] == \
        "class means coincide"
    assert co[("model", "", "nc3")]["reason"] == "no head"
    assert co[("model", "", "spearman_nc1")]["reason"] == "undefined at some layer"
    # layer 0 = h_0 (no block), layer 2 = the output of block 1 ("b1")
    assert (co[("layer", "0", "nc1")]["block"], co[("layer", "0", "nc1")]["block_index"]) == ("", "")
    assert (co[("layer", "2", "nc1")]["block"], co[("layer", "2", "nc1")]["block_index"]) == ("b1", "1")
    assert co[("layer", "2", "nc1")]["value"] == "" and co[("layer", "2", "nc1")]["reason"] == "class means coincide"
    assert co[("layer", "2", "sigma_b_condition")]["reason"] == "class means coincide"
    assert co[("layer", "2", "equinorm")]["value"] == "0.2" and co[("layer", "2", "equinorm")]["reason"] == ""
    assert co[("layer", "2", "ill_conditioned")]["value"] == "1" and co[("layer", "0", "rank_sigma_b")]["value"] == "1"
    assert not any(r["metric"] == "nc1_note" for r in rows["collapse.csv"])
    si = {(r["scope"], r["layer"], r["metric"]): r for r in rows["singularities.csv"]}
    assert si[("layer", "b0.relu#1", "weight_cos_max")]["value"] == ""
    assert si[("layer", "b0.relu#1", "weight_cos_max")]["reason"] == \
        "applied after the residual sum: no single incoming weight"
    assert si[("layer", "b0.relu#1", "n_in")]["reason"] == "applied after the residual sum: no single incoming weight"
    assert si[("layer", "b0.relu#0", "act_cos_max")]["reason"] == \
        "fewer than 2 non-zero activation columns (act_units_used = 1)"
    assert si[("layer", "b0.relu#0", "dead_fraction")]["value"] == "0.25"
    assert si[("layer", "b0.relu#0", "dead_fraction")]["block_index"] == "0"
    assert si[("layer", "b0.relu#1", "act_cos_max")]["value"] == "0.75"
    assert si[("model", "", "means.act_cos_max")]["reason"].startswith("no layer that is not post has a value")
    assert si[("model", "", "post_means.weight_cos_max")]["reason"].startswith("no post layer has a value")
    assert si[("model", "", "post_total_units")]["value"] == "4"
    # vectors and texts are not rows
    assert not any(r["metric"] in ("dead_units", "weight_norms", "cov_eigenvalues", "role", "weight_reason")
                   for r in rows["singularities.csv"])
    ex = {(r["scope"], r["stage"], r["metric"]): r for r in rows["expansion.csv"]}
    assert ex[("model", "", "num_runs")]["value"] == "1.0"
    assert ("model", "", "run0_mean_order") not in ex                 # the per-run rows hold it
    assert ex[("run", "0", "norms_mean[2]")]["value"] == "0.125" and ex[("run", "0", "norms_mean[2]")]["block"] == \
        "b1..b2"
    assert ex[("run", "0", "mean_order")]["reason"] == "1 of 3 samples x probes have every c_L^(m) = 0"
    assert ex[("run", "0", "distribution[1]")]["reason"].startswith("1 of 3")
    assert ex[("run", "0", "norms_mean[0]")]["reason"] == "" and ex[("run", "0", "num_undefined")]["value"] == "1"
