"""Every compiled op is complete: schema, C++ entry point, CPU and CUDA kernels, Python wrapper,
reference, tests (opcheck on every device), C++ test, benchmark and README row.

The list of ops is resgeom_fast._lib.OPS, checked against the schema files csrc/ops/<op>.cpp so
that a new op cannot skip it. A new op copies the files of masked_scale (the smallest one).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import resgeom_fast
from resgeom_fast import _lib, ops
from resgeom_fast.ops import _reference as ref

ROOT = Path(__file__).resolve().parents[2]
OPS = _lib.OPS


def _text(rel: str) -> str:
    path = ROOT / rel
    assert path.is_file(), f"missing {rel}"
    return path.read_text()


def test_ops_list_matches_the_schema_files():
    schema_files = {p.stem for p in (ROOT / "csrc" / "ops").glob("*.cpp")}
    assert schema_files == set(OPS)


@pytest.mark.parametrize("op", OPS)
def test_registered_with_kernels(op):
    name = f"resgeom_fast::{op}"
    assert hasattr(torch.ops.resgeom_fast, op)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    if resgeom_fast.built_with_cuda():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


@pytest.mark.parametrize("op", OPS)
def test_csrc_files(op):
    header = _text(f"csrc/ops/{op}.h")
    assert f"inline void check_{op}(" in header                       # the shared argument checks
    assert re.search(rf"\b{op}\(const at::Tensor&", header)           # the C++ entry point
    schema = _text(f"csrc/ops/{op}.cpp")
    assert f'm.def("{op}(' in schema
    assert f'findSchemaOrThrow("resgeom_fast::{op}", "")' in schema
    assert f'm.impl("{op}"' in _text(f"csrc/ops/cpu/{op}_kernel.cpp")
    assert f'm.impl("{op}"' in _text(f"csrc/ops/cuda/{op}_kernel.cu")


@pytest.mark.parametrize("op", OPS)
def test_python_wrapper_and_reference(op):
    assert op in ops.__all__ and callable(getattr(ops, op))
    assert callable(getattr(ref, op))


def _opcheck_devices(tree: ast.Module) -> list[str]:
    """The names the `device` parameter of test_opcheck is parametrised over."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "test_opcheck":
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "parametrize"
                        and isinstance(dec.args[0], ast.Constant) and dec.args[0].value == "device"):
                    return [ast.unparse(dec.args[1])]
    return []


@pytest.mark.parametrize("op", OPS)
def test_python_tests_run_opcheck_on_every_device(op):
    source = _text(f"tests/ops/test_{op}.py")
    assert "torch.library.opcheck(" in source
    assert _opcheck_devices(ast.parse(source)) == ["DEVICES"]


@pytest.mark.parametrize("op", OPS)
def test_cpp_test_benchmark_and_readme(op):
    assert re.search(rf"\brops::{op}\(", _text("tests/cpp/test_ops.cpp"))
    assert re.search(rf"\bvoid test_{op}\(", _text("tests/cpp/test_ops.cpp"))
    bench = _text("benchmarks/bench_ops.py")
    assert f"def test_{op}(" in bench and f"IMPLS[impl].{op}(" in bench
    assert f"| `{op}(" in _text("README.md")
