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
        # every reason in the CSV is results.json's text
        for row in rows:
            assert not row["reason"] or row["reason"] in json.dumps(res), row
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
