"""Turn a pytest-benchmark JSON into a Markdown table of ratios (implementation time / ours).

Usage: python benchmarks/scripts/ratios.py benchmarks/results/FILE.json > benchmarks/results/FILE.md
"""
from __future__ import annotations

import collections
import json
import platform
import sys

import torch


def main(path: str) -> None:
    data = json.load(open(path))
    groups: dict = collections.defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["params"]["impl"]] = (b["stats"]["mean"], b.get("extra_info", {}))
    info = data.get("machine_info", {})
    print(f"# {path}\n")
    print(f"- machine: {info.get('cpu', {}).get('brand_raw', platform.processor())}, "
          f"{info.get('cpu', {}).get('count', '?')} cores; torch {torch.__version__}; "
          f"date {data.get('datetime', '?')[:10]}\n")
    print("| group | implementation | mean ms | time / ours | extra |")
    print("|---|---|---:|---:|---|")
    for group, impls in groups.items():
        ours = next((k for k in impls if k.startswith("ours")), None)
        base = impls[ours][0] if ours else None
        for impl, (t, extra) in impls.items():
            ratio = f"{t / base:.2f}" if base else "-"
            ext = ", ".join(f"{k}={v:.2g}" for k, v in extra.items())
            print(f"| {group} | {impl} | {t * 1e3:.2f} | {ratio} | {ext} |")


if __name__ == "__main__":
    main(sys.argv[1])
