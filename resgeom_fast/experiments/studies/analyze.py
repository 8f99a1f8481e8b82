"""``resgeom analyze``: the analyses of resgeom_fast on a user's model (a torchvision or timm
ResNet or ``module:pkg.mod:factory``), with a checkpoint and data of the user's.

The analyses (``--analyses``, :data:`ANALYSES`; default :data:`DEFAULT_ANALYSES`, ``all`` = the
five), each one resumable step of the report folder, results under ``results["models"]["model"]``:

- ``alignment`` (``...["alignment"]``): residual alignment RA1-RA4 per stage on ``--samples`` inputs;
- ``hessian`` (``...["spectrum"]``): extreme eigenvalues (``--eigs``), trace and SLQ density of the
  Hessian of the mean ``--loss`` over ``--batch-size`` samples, parameters ``--params``;
- ``collapse`` (``...["collapse"]``): neural-collapse metrics of h_0..h_L on ``--samples`` inputs
  (every class must occur among them);
- ``singularities`` (``...["singularities"]``): dead units, overlaps and linear dependence of the
  activation layers on ``--samples`` inputs;
- ``expansion`` (``...["expansion"]``): the path-order decomposition of d h_L / d h_0 v on
  ``--samples`` inputs, once per plain run of consecutive blocks
  (``resgeom_fast.analysis.expansion.plain_runs``), recorded per run under ``["runs"]``.

``--blocks`` restricts alignment, collapse (the representations after the selected blocks) and
expansion (the selected blocks of each run) to some residual blocks.

The command in two parts: :func:`prepare` checks every flag, loads the model, the checkpoint and
the data and returns an :class:`AnalyzeSetup` (UsageErrors before any work); :func:`run_steps`
runs the analyses as resumable steps of a :class:`Runner` and writes the report.
:func:`resgeom_fast.experiments.commands.analyze` joins them; :func:`add_arguments` holds the flags.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

# modules, not functions: calls go through the analysis modules (see _shared); import_module where
# resgeom_fast.analysis exports a function of the module's name
from resgeom_fast.analysis import alignment as alignment_analysis
from resgeom_fast.analysis import expansion as expansion_analysis
from resgeom_fast.analysis import spectrum as spectrum_analysis
from resgeom_fast.core.blocks import block_kinds, residual_blocks
from resgeom_fast.core.io import file_sha256
from resgeom_fast.models.network import seeded_construction

from ..common import (
    NORMALIZATIONS,
    USER_DATA_HELP,
    data_key_parts,
    load_data,
    load_imagefolder,
    load_tensors,
    resolve_device,
)
from ..config import UsageError, int_flag
from ..output import check_out, write_study_report
from ..figures import new_figure
from ..report import FigureSpec, Report, fmt_key, get_path
from ..runner import Runner
from .. import tables
from ._figures import collapse_figure, density_figure, stage_figures
from ._registry import Command, register_command

collapse_analysis = importlib.import_module("resgeom_fast.analysis.collapse")
singularities_analysis = importlib.import_module("resgeom_fast.analysis.singularities")

__all__ = ["ANALYSES", "COMMAND", "DEFAULT_ANALYSES", "LOSSES", "AnalyzeSetup", "add_arguments", "analyze_data",
           "check_model_takes", "expansion_runs", "factory_key", "import_user_module", "load_checkpoint",
           "load_model", "load_timm_model", "loss_function", "parse_analyses", "parse_blocks", "prepare",
           "run_steps", "write_analysis_tables"]

# the analyses of --analyses, in the order they run (and the report shows them)
ANALYSES: tuple[str, ...] = ("alignment", "hessian", "collapse", "singularities", "expansion")
# the default: the two analyses analyze had first (a run of the default keeps its results and timing)
DEFAULT_ANALYSES = "alignment,hessian"
# --loss: the Hessian's loss of the model output and the labels (see loss_function)
LOSSES: tuple[str, ...] = ("ce", "mse", "nll")


@dataclass
class AnalyzeSetup:
    """What :func:`prepare` hands to :func:`run_steps`.

    Attributes:
        net: the model, in eval mode on the device.
        x, y: inputs [N, C, H, W] and labels [N] (int64) on the device, N = max(samples, batch) (for
            imagefolder / tensors data at most their size, at least the analyses' own counts).
        config: the run's configuration (results.json's ``config``; the runner's hash).
        key_parts: what the steps are keyed on beyond the configuration (checkpoint, model code, data files).
    """

    net: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    config: dict[str, Any]
    key_parts: dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``resgeom analyze`` (values stay strings: :func:`prepare` checks them)."""
    a = parser
    a.add_argument("--model", required=True, help="torchvision:NAME (resnet18, resnet34, ...), timm:NAME (resnet18, resnet50d, ...: "
                        "timm.list_models('resnet*')) or module:pkg.mod:factory (pkg importable from the current folder)")
    a.add_argument("--checkpoint", default=None, help="state dict or resgeom trainer checkpoint (.pt) to load")
    a.add_argument("--data", required=True,
                   help="imagefolder:PATH (torchvision ImageFolder: one subfolder of images per class) | "
                        "tensors:FILE.pt (torch.save of {'x': X, 'y': Y} or (X, Y)) | digits | "
                        "torchvision:NAME:ROOT | random-cifar (Gaussian noise images, for a smoke test); "
                        "the samples read are the first --samples/--batch of a permutation drawn with --seed")
    a.add_argument("--image-size", default=None,
                   help="imagefolder: resize the shorter side to N, then center-crop N x N (default: the images' "
                        "own size, which they must share)")
    a.add_argument("--normalize", default=None, choices=list(NORMALIZATIONS),
                   help="imagefolder: normalise with the ImageNet mean/std (imagenet, the default) or not (none)")
    a.add_argument("--no-normalize", dest="normalize", action="store_const", const="none",
                   help="imagefolder: same as --normalize none")
    a.add_argument("--num-classes", default="10", help="classes of the model's head / the data (default 10)")
    a.add_argument("--samples", default="8",
                   help="inputs of alignment, collapse, singularities and expansion (default 8; collapse needs "
                        "every class among them)")
    a.add_argument("--batch-size", "--batch", dest="batch", default="32",
                   help="samples of the Hessian's loss, one batch (default 32; --batch is the same flag)")
    a.add_argument("--k", default=None, help="singular triplets per block of the alignment (default C + 5)")
    a.add_argument("--power-iters", default="auto",
                   help="randomized SVD power iterations: auto (default; iterate until the error bound meets the "
                        "tolerance) or a fixed count")
    a.add_argument("--oversample", default="10", help="randomized SVD oversampling (default 10)")
    a.add_argument("--probes", default="4", help="SLQ probes of the Hessian density (default 4)")
    a.add_argument("--steps", default="30", help="Lanczos steps per SLQ probe (default 30)")
    a.add_argument("--trace-probes", default="12", help="Hutch++ products for the trace (default 12)")
    a.add_argument("--params", default=None,
                   help="comma list of parameter / module names spanning the Hessian (default: all; e.g. layer4,fc)")
    a.add_argument("--loss", default="ce",
                   help="the Hessian's loss, a mean over the batch: ce (cross-entropy of the model's logits, the "
                        "default) | mse (mean over the N x C entries of (output - one_hot(y))^2) | nll (negative "
                        "log-likelihood of a model that outputs log-probabilities, e.g. ending in log_softmax: "
                        "checked on the data)")
    a.add_argument("--eigs", default="2",
                   help="extreme Hessian eigenvalues to compute, >= 2 (half at each end; default 2)")
    a.add_argument("--analyses", default=DEFAULT_ANALYSES,
                   help=f"comma list of {', '.join(ANALYSES)}, or all (default {DEFAULT_ANALYSES})")
    a.add_argument("--blocks", default=None,
                   help="residual blocks for alignment, collapse and expansion: comma list of indices (0-based, "
                        "in forward order), inclusive ranges A-B and block module names (e.g. 0-3,layer4.1; "
                        "default all)")
    a.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    a.add_argument("--seed", default="0",
                   help="seed of the model's initialisation (without --checkpoint), the data sample and the probes "
                        "(default 0)")
    a.add_argument("--out", default="reports/analyze", help="report folder (default reports/analyze)")


def parse_analyses(spec: Any) -> list[str]:
    """``--analyses``: a comma list of :data:`ANALYSES` (any order, repeats ignored) or ``all``;
    the analyses in :data:`ANALYSES` order. A UsageError naming the flag for anything else."""
    items = [a.strip() for a in str(spec if spec is not None else "").split(",") if a.strip()]
    bad = [a for a in items if a not in ANALYSES and a != "all"]
    if bad or not items:
        raise UsageError(f"--analyses: unknown analysis {bad}; allowed: {', '.join(ANALYSES)}, all")
    return [a for a in ANALYSES if a in items or "all" in items]


def _block_list(names: list[str]) -> str:
    shown = ", ".join(f"{i}:{n or '(model)'}" for i, n in enumerate(names[:40]))
    return shown + (f", ... ({len(names)} blocks)" if len(names) > 40 else "")


def parse_blocks(spec: Any, names: list[str]) -> list[int]:
    """``--blocks``: the selected residual blocks as sorted distinct indices into ``names`` (the
    model's blocks in forward order, :func:`~resgeom_fast.core.blocks.residual_blocks`).

    ``spec`` is a comma list of indices ``i`` (0-based), inclusive ranges ``a-b`` and block module
    names (``layer4.1``). Anything else (an unknown name, an index out of range, ``b < a``, an
    empty list) is a one-line UsageError listing the model's blocks as ``index:name``.
    """
    where = f"the model's {len(names)} residual blocks are {_block_list(names)}"
    items = [t.strip() for t in str(spec).split(",") if t.strip()]
    if not items:
        raise UsageError(f"--blocks: expected a comma list of block indices, ranges A-B or names, got {spec!r}; "
                         f"{where}")
    chosen: set[int] = set()
    for t in items:
        rng = re.fullmatch(r"(\d+)\s*-\s*(\d+)", t)
        if t.isdigit() or rng:
            lo, hi = (int(t), int(t)) if t.isdigit() else (int(rng.group(1)), int(rng.group(2)))
            if lo > hi or hi >= len(names):
                raise UsageError(f"--blocks: expected indices in [0, {len(names) - 1}] (ranges A-B with A <= B), "
                                 f"got {t!r}; {where}")
            chosen.update(range(lo, hi + 1))
        elif t in names:
            chosen.add(names.index(t))
        else:
            raise UsageError(f"--blocks: no residual block named {t!r}; {where}")
    return sorted(chosen)


def _mse_one_hot(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``--loss mse``: mean over the N x C entries of (output - one_hot(y, C))^2 (F.mse_loss)."""
    return F.mse_loss(output, F.one_hot(y, output.shape[-1]).to(output.dtype))


def loss_function(name: str) -> Any:
    """The Hessian's loss ``loss(output [N, C], y [N] int64) -> scalar`` of ``--loss``: ``ce``
    F.cross_entropy of logits (mean over N); ``mse`` the mean over the N x C entries of
    (output - one_hot(y))^2 (F.mse_loss against one-hot targets); ``nll`` F.nll_loss of
    log-probabilities (mean over N of -output[n, y_n]; the model must output log-probabilities,
    which :func:`prepare` checks)."""
    losses = {"ce": F.cross_entropy, "mse": _mse_one_hot, "nll": F.nll_loss}
    if name not in losses:
        raise UsageError(f"--loss: expected one of {list(LOSSES)}, got {name!r}")
    return losses[name]


def _check_log_probabilities(net: Any, x: torch.Tensor) -> None:
    """``--loss nll``: every output row of ``net`` on ``x`` must be log-probabilities (logsumexp 0
    to 1e-3), else the NLL would be a number of another loss."""
    with torch.no_grad():
        out = net(x)
    lse = torch.logsumexp(out.double(), dim=1).abs().max().item()
    if not lse <= 1e-3:
        raise UsageError(f"--loss nll: expected the model to output log-probabilities (logsumexp of every output "
                         f"row 0), got logsumexp up to {lse:.3g} on the first {x.shape[0]} inputs; use --loss ce for "
                         f"a model that outputs logits")


def expansion_runs(net: Any, x: torch.Tensor, selected: Optional[list[int]] = None) -> list[list[int]]:
    """The runs of ``expansion``: the maximal plain runs of consecutive blocks of ``net`` on ``x``
    (:func:`resgeom_fast.analysis.expansion.plain_runs`) as lists of block indices, restricted to
    ``selected`` (``--blocks``; a run then splits where it skips a block, and runs with no
    selected block drop out)."""
    runs = [sorted(int(b) for b in run) for run in expansion_analysis.plain_runs(net, x)]
    if selected is None:
        return runs
    keep = set(selected)
    out: list[list[int]] = []
    for run in runs:
        cur: list[int] = []
        for b in run:
            if b in keep and (not cur or b == cur[-1] + 1):
                cur.append(b)
            else:
                if cur:
                    out.append(cur)
                cur = [b] if b in keep else []
        if cur:
            out.append(cur)
    return out


def load_model(spec: str, num_classes: int):
    """(model, key parts) for ``--model`` ``torchvision:NAME``, ``timm:NAME`` or
    ``module:pkg.mod:factory`` (imported with the current folder on sys.path): the key parts say
    what the model's code is keyed on (torchvision's or timm's version, or the sha256 of the
    factory's source and of its module file)."""
    if spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        try:  # torchvision is optional (pip install resgeom_fast[vision])
            import torchvision
            import torchvision.models as tvm
        except ImportError:
            raise UsageError("--model torchvision:...: torchvision is not installed (pip install torchvision)") from None
        allowed = sorted(n for n in tvm.list_models(module=tvm) if n.startswith(("resnet", "wide_resnet", "resnext")))
        if name not in allowed:
            raise UsageError(f"--model: unknown torchvision model {name!r}; allowed: {', '.join(allowed)}")
        return tvm.get_model(name, weights=None, num_classes=num_classes), {"torchvision": torchvision.__version__}
    if spec.startswith("timm:"):
        return load_timm_model(spec.split(":", 1)[1], num_classes)
    if spec.startswith("module:"):
        parts = spec.split(":")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise UsageError(f"--model: expected module:package.module:factory, got {spec!r}")
        mod = import_user_module(parts[1])
        factory = getattr(mod, parts[2], None)
        if not callable(factory):
            raise UsageError(f"--model: module {parts[1]!r} has no callable {parts[2]!r}")
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"--model: {parts[1]}.{parts[2]}() returned {type(model).__name__}, not an nn.Module")
        return model, factory_key(mod, factory)
    raise UsageError(f"--model: expected torchvision:NAME or module:package.module:factory or timm:NAME, got {spec!r}")


def load_timm_model(name: str, num_classes: int):
    """(timm.create_model(name, pretrained=False, num_classes=num_classes), {"timm": version}) for a
    name in ``timm.list_models("resnet*")``; a one-line UsageError for another name or without timm."""
    try:  # timm is optional (pip install timm)
        import timm
    except ImportError:
        raise UsageError("--model timm:...: timm is not installed (pip install timm)") from None
    allowed = list(timm.list_models("resnet*"))  # timm's natural order: resnet10t, resnet14t, resnet18, ...
    if name not in allowed:
        raise UsageError(f"--model: unknown timm model {name!r}; allowed: {', '.join(allowed)}")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    return model, {"timm": timm.__version__}


def import_user_module(name: str) -> Any:
    """``importlib.import_module(name)`` with the current folder first on ``sys.path`` while
    importing (as ``python -m`` does, so ``module:mynet:build`` finds ./mynet.py); sys.path is
    restored afterwards. A one-line UsageError naming --model if the import fails."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any failure importing the user's code is bad input
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"--model: cannot import module {name!r} ({type(err).__name__}: {first})") from None
    finally:
        if added:
            try:
                sys.path.remove(cwd)
            except ValueError:
                pass


def factory_key(mod: Any, factory: Any) -> dict[str, str]:
    """sha256 of ``factory``'s source and of its module's file: a changed factory (or a changed
    helper in the same file) changes the key of every analyze step. Code in other files the
    factory imports is not covered (documented; use --fresh after changing it)."""
    try:
        src = hashlib.sha256(inspect.getsource(factory).encode()).hexdigest()
    except (OSError, TypeError):
        src = "unavailable"
    path = getattr(mod, "__file__", None)
    return {"factory source sha256": src,
            "factory module sha256": file_sha256(path) if path and os.path.isfile(path) else "unavailable"}


def load_checkpoint(model, path: str, num_classes: Optional[int] = None) -> None:
    """Load the state dict in ``path`` into ``model``; a one-line UsageError naming ``--checkpoint``
    otherwise.

    The file (read with ``weights_only=True``: no pickled code runs) holds a plain state dict, a
    checkpoint holding one under ``model`` (resgeom's trainer) or ``state_dict`` (PyTorch
    Lightning), or any of these with every key under a prefix: ``module.`` (a model saved inside
    DistributedDataParallel / DataParallel), ``model.`` or another attribute name of a
    LightningModule, or both (``model.module.``). Keys are taken as they are when they match the
    model's; otherwise the prefix (up to three dotted names) under which the keys match the model's
    exactly is stripped (keys outside it, such as a Lightning module's loss weights, are ignored).
    Two prefixes matching (a model and its EMA copy) is a UsageError naming both.

    A mismatch is a UsageError naming the first missing and the first unexpected key and the first
    key whose shape differs (checkpoint and model shapes); when the differing shape is a classifier's
    (first dimension ``num_classes`` in the model, another count in the checkpoint, the rest equal)
    it suggests ``--num-classes``.
    """
    if not os.path.isfile(path):
        raise UsageError(f"--checkpoint: file not found: {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is bad input
        hint = ("; a checkpoint holding pickled Python objects (e.g. a Lightning checkpoint's hyper-parameters) "
                "cannot be read safely: save its state dict alone, torch.save(ckpt['state_dict'], 'weights.pt')"
                if "weights_only" in str(err) or "Unpickl" in type(err).__name__ else "")
        raise UsageError(f"--checkpoint: cannot read {path!r} ({type(err).__name__}: "
                         f"{(str(err).strip().splitlines() or [''])[0][:300]}){hint}") from None
    def is_state(d: Any) -> bool:
        return isinstance(d, dict) and any(isinstance(v, torch.Tensor) for v in d.values())

    state = None
    if isinstance(obj, dict):
        state = next((obj[k] for k in ("model", "state_dict") if is_state(obj.get(k))), obj)
    if not is_state(state):
        raise UsageError(f"--checkpoint: {path!r} holds no state dict")
    expected = model.state_dict()
    state, prefix = _match_prefix(state, expected, path)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, _shape(state[k]), list(v.shape)) for k, v in expected.items()
              if k in state and _shape(state[k]) != list(v.shape)]
    if missing or unexpected or shapes:
        raise UsageError(_mismatch_message(path, prefix, missing, unexpected, shapes, num_classes))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UsageError(f"--checkpoint: {path!r} does not match the model "
                         f"({(str(err).strip().splitlines() or [''])[0][:300]})") from None


def _shape(value: Any) -> Any:
    """A state-dict value's shape as a list (its type's name for a non-tensor)."""
    return list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _match_prefix(state: dict, expected: dict, path: str) -> tuple[dict, str]:
    """(state with the prefix stripped, the prefix) for the prefix under which ``state``'s keys are
    exactly the model's (``""``: as they are); with none, the prefix under which most keys match
    (for the mismatch message)."""
    keys = [k for k in state if isinstance(k, str)]
    want = set(expected)
    if set(keys) == want:
        return state, ""
    prefixes = {".".join(k.split(".")[:i]) + "." for k in keys for i in (1, 2, 3) if k.count(".") >= i}
    subsets = {p: {k[len(p):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(p)}
               for p in sorted(prefixes)}
    exact = [p for p, sub in subsets.items() if set(sub) == want]
    if len(exact) > 1:
        raise UsageError(f"--checkpoint: {path!r} holds the model's keys under several prefixes {exact}; save the "
                         f"one to analyse as a plain state dict")
    if exact:
        return subsets[exact[0]], exact[0]
    best, best_overlap = "", len(want & set(keys))
    for p, sub in subsets.items():
        overlap = len(want & set(sub))
        if overlap > best_overlap:
            best, best_overlap = p, overlap
    return (subsets[best], best) if best else (state, "")


def _mismatch_message(path: str, prefix: str, missing: list, unexpected: list, shapes: list,
                      num_classes: Optional[int]) -> str:
    """The one-line UsageError text of :func:`load_checkpoint` for a checkpoint that does not fit."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
    if shapes:
        k, got, want = shapes[0]
        parts.append(f"{len(shapes)} key(s) of another shape, first {k!r}: checkpoint {got}, model {want}")
    where = f" (keys read with the prefix {prefix!r} stripped)" if prefix else ""
    msg = f"--checkpoint: {path!r} does not match the model{where}: " + "; ".join(parts)
    heads = [got[0] for _, got, want in shapes if isinstance(got, list) and got and want
             and want[0] == num_classes and got[0] != num_classes and got[1:] == want[1:]]
    if heads:
        msg += (f"; the checkpoint's classifier has {heads[0]} classes, the model {num_classes}: "
                f"pass --num-classes {heads[0]}")
    return msg


def analyze_data(spec: str, n: int, num_classes: int, seed: int, *, image_size: Optional[int] = None,
                 normalize: Optional[str] = None, need: Optional[int] = None):
    """(x, y) tensors [n, ...] for analyze (x float, y int64 labels).

    "random-cifar": Gaussian noise [n, 3, 32, 32] with random labels; "digits" /
    "torchvision:NAME:ROOT": the first n training samples; "imagefolder:PATH" /
    "tensors:FILE.pt": the first n of a permutation drawn with ``seed``
    (:func:`~resgeom_fast.experiments.common.sample_indices`; fewer than ``need`` samples is a
    UsageError) read by :func:`~resgeom_fast.experiments.common.load_imagefolder` (``image_size``,
    ``normalize``: "imagenet" by default) / :func:`~resgeom_fast.experiments.common.load_tensors`.
    The labels must lie in [0, num_classes).
    """
    if (image_size is not None or normalize is not None) and not spec.startswith("imagefolder:"):
        flag = "--image-size" if image_size is not None else "--normalize"
        raise UsageError(f"{flag}: applies to --data imagefolder:PATH only, got --data {spec}")
    if spec == "random-cifar":
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, num_classes, (n,), generator=gen)
    if spec == "digits" or spec.startswith("torchvision:"):
        ds = load_data(spec, image=True, n_train=n, n_test=1, seed=seed)
        return ds.x_train[:n], ds.y_train[:n]
    if spec.startswith("imagefolder:"):
        x, y = load_imagefolder(spec, n, seed=seed, image_size=image_size,
                                normalize="imagenet" if normalize is None else normalize, need=need)
    elif spec.startswith("tensors:"):
        x, y = load_tensors(spec, n, seed=seed, need=need)
    else:
        raise UsageError(f"--data: expected digits, random-cifar, torchvision:NAME:ROOT, {USER_DATA_HELP.replace(' |', ',')}"
                         f", got {spec!r}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UsageError(f"--num-classes: --data {spec} has labels {int(y.min())}..{int(y.max())}, expected them in "
                         f"[0, {num_classes}) (--num-classes {num_classes})")
    return x, y


def prepare(*, model: str, checkpoint: Optional[str], data: str, num_classes: Any = 10, samples: Any = 8,
            batch: Any = 32, k: Any = None, power_iters: Any = "auto", oversample: Any = 10, probes: Any = 4,
            steps: Any = 30, trace_probes: Any = 12, analyses: str = DEFAULT_ANALYSES, device: str = "cpu",
            seed: Any = 0, out: str = "reports/analyze", params: Optional[str] = None,
            deterministic: bool = False, image_size: Any = None, normalize: Optional[str] = None,
            blocks: Optional[str] = None, loss: str = "ce", eigs: Any = 2) -> AnalyzeSetup:
    """Check every flag (as written on the command line or as Python values), ``--out``, the
    model, the checkpoint and the data, in this order; a :class:`UsageError` for the first that
    cannot work. See :func:`resgeom_fast.experiments.commands.analyze` for the arguments.

    The setup's ``key_parts``: the sha256 of the ``--checkpoint`` file's contents, the model code
    (torchvision's or timm's version, or the sha256 of the factory's source and of its module file) and the
    data files (:func:`~resgeom_fast.experiments.common.data_key_parts`: for imagefolder:PATH the
    folder's file list and the contents of the images read, for tensors:FILE.pt the file).

    ``image_size`` (an int >= 1) and ``normalize`` ("imagenet" or "none"; None: "imagenet") apply
    to imagefolder data only (a UsageError with another ``data``); both enter the configuration.

    ``analyses``: :func:`parse_analyses`. ``blocks``: :func:`parse_blocks` against the model's
    residual blocks (the configuration holds the selected blocks' names). ``loss``: one of
    :data:`LOSSES` (:func:`loss_function`; ``nll`` checks that the model outputs
    log-probabilities). ``eigs``: extreme Hessian eigenvalues, an int in [2, min(P, 500)] for the P
    parameters spanning the Hessian. Before any work it also checks that alignment, collapse and
    expansion find residual blocks and that collapse's ``samples`` inputs hold every class.
    """
    C = int_flag("--num-classes", num_classes, 2)
    n_align, n_hess = int_flag("--samples", samples, 1), int_flag("--batch-size", batch, 1)
    kk = None if k is None else int_flag("--k", k, 1)
    try:
        q = "auto" if str(power_iters).strip().lower() == "auto" else int_flag("--power-iters", power_iters, 0)
    except UsageError:
        raise UsageError(f"--power-iters: expected auto or an int >= 0, got {power_iters!r}") from None
    p = int_flag("--oversample", oversample, 0)
    nv, m, tp = (int_flag("--probes", probes, 1), int_flag("--steps", steps, 2),
                 int_flag("--trace-probes", trace_probes, 3))
    sd = int_flag("--seed", seed, 0)
    which = parse_analyses(analyses)
    if loss not in LOSSES:
        raise UsageError(f"--loss: expected one of {list(LOSSES)}, got {loss!r}")
    n_eigs = int_flag("--eigs", eigs, 2)
    if blocks is not None and not str(blocks).strip():
        raise UsageError(f"--blocks: expected a comma list of block indices, ranges A-B or names, got {blocks!r}")
    size = None if image_size is None else int_flag("--image-size", image_size, 1)
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise UsageError(f"--normalize: expected one of {list(NORMALIZATIONS)}, got {normalize!r}")
    if not isinstance(data, str) or not data:
        raise UsageError(f"--data: expected digits, random-cifar, torchvision:NAME:ROOT, "
                         f"{USER_DATA_HELP.replace(' |', ',')}, got {data!r}")
    dev = resolve_device(device)
    check_out(out)
    # the initial weights come from --seed (the caller's global RNG is left as it was): a model
    # analysed without --checkpoint is reproducible, and the steps' key (which holds the seed)
    # describes the weights the numbers were computed on
    with seeded_construction(sd):
        net, key_parts = load_model(model, C)
    if checkpoint:
        if os.path.isfile(checkpoint):  # hashed first: the key describes the bytes loaded next
            key_parts = {"checkpoint sha256": file_sha256(checkpoint), **key_parts}
        load_checkpoint(net, checkpoint, C)
    net = net.to(dev).eval()
    chosen = None
    if params:
        chosen = [t.strip() for t in params.split(",") if t.strip()]
        names = set(dict(net.named_parameters())) | set(dict(net.named_modules()))
        unknown = [t for t in chosen if t not in names]
        if unknown:
            top = [n for n, _ in net.named_children()]
            raise UsageError(f"--params: no parameter or module named {unknown}; top-level modules: {', '.join(top)}")
    if "hessian" in which:
        dim = sum(t.numel() for n, t in net.named_parameters() if t.requires_grad and (
            chosen is None or any(n == c or n.startswith(c + ".") for c in chosen)))
        if not 2 <= n_eigs <= min(dim, 500):
            raise UsageError(f"--eigs: expected an int in [2, {min(dim, 500)}] (the Hessian spans {dim} parameters; "
                             f"at most 500), got {eigs!r}")
    infos = residual_blocks(net, required=False)
    need_blocks = [a for a in which if a in ("alignment", "expansion")
                   or a == "collapse" and not _has_return_hidden(net)]
    if need_blocks and not infos:
        raise UsageError(f"--analyses: {', '.join(need_blocks)} need residual blocks, found none in "
                         f"{type(net).__name__} (known block kinds: {', '.join(block_kinds())}; mark others with "
                         f"resgeom_fast.operators.mark_residual_block in the model factory)")
    sel_blocks = None
    if blocks is not None:
        if not infos:
            raise UsageError(f"--blocks: found no residual blocks in {type(net).__name__} (known block kinds: "
                             f"{', '.join(block_kinds())})")
        sel_blocks = [infos[i].name for i in parse_blocks(blocks, [i.name for i in infos])]
    n = max(n_align, n_hess)
    # the user's files are hashed first (the key describes the bytes read next): for an image
    # folder its file list and the images the first n of the --seed permutation pick (the
    # same n whichever analyses run, so adding one does not re-key the others)
    data_key = data_key_parts(data, samples=n, seed=sd)
    uses_samples = any(a != "hessian" for a in which)
    need = max(n_align if uses_samples else 1, n_hess if "hessian" in which else 1)
    x, y = analyze_data(data, n, C, sd, image_size=size, normalize=normalize, need=need)
    if x.dim() == 2:
        raise UsageError("--data: analyze expects image data [N, C, H, W] for this model")
    x, y = x.to(dev), y.to(dev)
    check_model_takes(net, model, x, data, C)
    if "hessian" in which and loss == "nll":
        _check_log_probabilities(net, x[:n_hess])
    if "collapse" in which:
        present = set(int(c) for c in y[:n_align].tolist())
        missing = [c for c in range(C) if c not in present]
        if missing:
            raise UsageError(f"--samples: collapse needs at least one sample of every class among the {n_align} "
                             f"analysed inputs (--samples {n_align}), got {C - len(missing)} of the {C} classes "
                             f"(none of {missing[:10]}{' ...' if len(missing) > 10 else ''}); raise --samples or "
                             f"check --num-classes")
    cfg = {"model": model, "checkpoint": os.path.abspath(checkpoint) if checkpoint else None, "data": data,
           "num_classes": C, "samples": n_align, "batch": n_hess, "k": kk, "power_iters": q, "oversample": p,
           "probes": nv, "steps": m, "trace_probes": tp, "analyses": which, "device": device, "seed": sd, "params": chosen,
           "deterministic": bool(deterministic), "image_size": size,
           "normalize": ("imagenet" if normalize is None else normalize) if data.startswith("imagefolder:") else None,
           "blocks": sel_blocks, "loss": loss, "eigs": n_eigs}
    key_parts = {**key_parts, **data_key}
    return AnalyzeSetup(net, x, y, cfg, key_parts)


def _has_return_hidden(net: Any) -> bool:
    """Whether ``net.forward`` takes ``return_hidden`` (this package's models: collapse reads h_0..h_L so)."""
    try:
        return "return_hidden" in inspect.signature(net.forward).parameters
    except (TypeError, ValueError):
        return False


def check_model_takes(net: Any, spec: str, x: Any, data: str, num_classes: int) -> None:
    """One forward pass of one input: the model must take ``--data``'s inputs and return [1, C] logits."""
    try:
        with torch.no_grad():
            out = net(x[:1])
    except Exception as err:  # noqa: BLE001 - any failure here is a model / data mismatch
        first = (str(err).strip().splitlines() or [""])[0][:300]
        hint = ""
        if "channels" in first and x.dim() == 4:
            hint = (f"; --data {data} has {x.shape[1]}-channel {x.shape[2]}x{x.shape[3]} images"
                    + (", torchvision ResNets expect 3 channels: use --data imagefolder:PATH, torchvision:cifar10:ROOT "
                       "or random-cifar, "
                       "or a module:... model built for 1 channel" if spec.startswith("torchvision:") else ""))
        raise UsageError(f"--model {spec}: cannot take --data {data} inputs of shape {list(x.shape[1:])} "
                         f"({type(err).__name__}: {first}){hint}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != num_classes:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"--num-classes: expected the model's output [N, {num_classes}] logits (--num-classes "
                         f"{num_classes}), got {got}")


# what every analysis step is keyed on besides its own settings: the model, its weights, the data
# (``loaded`` = the inputs loaded, max(samples, batch): the label draw of random-cifar depends on it)
_COMMON_DEPS = ("model", "checkpoint", "data", "num_classes", "device", "seed", "deterministic", "image_size",
                "normalize")
_STEP_DEPS = {
    "alignment": ("samples", "k", "power_iters", "oversample", "blocks"),
    "hessian": ("batch", "probes", "steps", "trace_probes", "params", "loss", "eigs"),
    "collapse": ("samples", "blocks"),
    "singularities": ("samples",),
    "expansion": ("samples", "blocks"),
}


def step_deps(cfg: dict[str, Any], analysis: str) -> dict[str, Any]:
    """The configuration the step of ``analysis`` is keyed on: the model, data and seed settings,
    the number of inputs loaded and the analysis' own settings (another analysis' settings, or
    ``--analyses`` itself, do not re-key it: adding an analysis to a finished run computes only
    the new one)."""
    deps = {key: cfg.get(key) for key in _COMMON_DEPS + _STEP_DEPS[analysis]}
    deps["loaded"] = max(cfg["samples"], cfg["batch"])
    deps["analysis"] = analysis
    return deps


def _one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:400]


def _result_step(runner: Runner, analysis: str, cfg: dict[str, Any], fn: Any) -> dict[str, Any]:
    """Step ``analysis``: ``{"result": r.to_dict(), "summary": r.summary()}`` of ``r = fn()`` (or
    ``fn()``'s own dict when it returns one). The ValueError / TypeError by which an analysis
    refuses the model or the data (no layers of units, no plain run, no stage among the selected
    blocks, a NaN in the model, ...) becomes a one-line UsageError naming the analysis (the
    finished steps are kept); any other exception is the command's unexpected failure."""
    def run() -> dict[str, Any]:
        try:
            r = fn()
        except (ValueError, TypeError) as err:
            raise UsageError(f"--analyses {analysis}: {type(err).__name__}: {_one_line(err)} (finished steps are "
                             f"kept: run again without {analysis} in --analyses)") from None
        return r if isinstance(r, dict) else {"result": r.to_dict(), "summary": r.summary()}

    return runner.step(analysis, run, deps=step_deps(cfg, analysis))


def _selected_indices(net: Any, names: Optional[list[str]]) -> Optional[list[int]]:
    """The indices of the ``--blocks`` names (the configuration's) among the model's blocks."""
    if names is None:
        return None
    index = {i.name: i.index for i in residual_blocks(net)}
    return [index[n] for n in names]


def _expansion(net: Any, x: Any, sel: Optional[list[int]], seed: int) -> dict[str, Any]:
    """path_expansion of every run of :func:`expansion_runs` (one probe per input): ``{"runs":
    [{"blocks": names, "block_indices", "result", "summary"}], "summary"}``; the summary holds
    ``num_runs`` and each run's summary keys as ``run<i>_<key>``."""
    names = [i.name for i in residual_blocks(net)]
    runs = expansion_runs(net, x, sel)
    if not runs:
        raise ValueError("path_expansion: expected at least one run of consecutive residual blocks forming a plain "
                         f"stack among the selected blocks, got none (blocks {sel})")
    out, summary = [], {"num_runs": float(len(runs))}
    for i, run in enumerate(runs):
        r = expansion_analysis.path_expansion(net, x, blocks=run, num_probes=1, seed=seed)
        rs = r.summary()
        out.append({"blocks": [names[b] for b in run], "block_indices": list(run), "result": r.to_dict(),
                    "summary": rs})
        summary.update({f"run{i}_{key}": v for key, v in rs.items()})
    return {"runs": out, "summary": summary}


def singularities_figure(root: str = "models.model.singularities") -> FigureSpec:
    """plot_singularities of the singularities step at ``root``: dead fraction, overlap and
    effective rank per layer; the reading gives the summary and the layer count."""
    def build(r: dict) -> Any:
        return singularities_analysis.plot_singularities(r, at=f"{root}.result")

    def reading(r: dict) -> str:
        s = get_path(r, f"{root}.summary") or {}
        layers = get_path(r, f"{root}.result.layers") or []
        roles: dict[str, int] = {}
        for layer in layers:
            roles[str(layer.get("role"))] = roles.get(str(layer.get("role")), 0) + 1
        counts = ", ".join(f"{n} {role}" for role, n in roles.items())
        return (f"{len(layers)} layers of units ({counts}): " + ", ".join(
            f"{k.replace('_', ' ')} {fmt_key(s, k)}" for k in s if not k.endswith("_reason"))
            + " (means over the layers that are not post; post = the units after a residual sum; dead = the "
              "activation's dead rule at every observation: docs/science.md section 2).")

    return FigureSpec("singularities", "Singularities per layer", build, reading)


def expansion_figure(runs: int, root: str = "models.model.expansion") -> FigureSpec:
    """plot_path_orders of each run of the expansion step at ``root`` (one panel per run)."""
    def build(r: dict) -> Any:
        fig, axes = new_figure(runs)
        for i, ax in enumerate(axes):
            expansion_analysis.plot_path_orders(r, ax, at=f"{root}.runs.{i}.result")
            names = get_path(r, f"{root}.runs.{i}.blocks")
            ax.set_title(f"run {i}: blocks {names[0]} .. {names[-1]}", fontsize=9)
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        parts = []
        for i in range(runs):
            run = get_path(r, f"{root}.runs.{i}")
            s = run["summary"]
            parts.append(f"run {i} ({len(run['blocks'])} blocks {run['blocks'][0]} .. {run['blocks'][-1]}): mean "
                         f"path order {fmt_key(s, 'mean_order')}, most weighted order {fmt_key(s, 'mode_order')}, "
                         f"relative tail {fmt_key(s, 'tail_rel')}")
        posts = {p for i in range(runs) for p in get_path(r, f"{root}.runs.{i}.result").get("posts") or []}
        gated = ("; every path is gated by the post-activations' Jacobians P_l, so order 0 is prod P_l Q_l, not the "
                 "identity" if posts - {"Identity"} else "")
        return "; ".join(parts) + f" (order m = paths through m residual branches{gated}; docs/science.md section 3)."

    return FigureSpec("path_orders", "Path-order decomposition per run", build, reading)


def run_steps(runner: Runner, net: Any, x: Any, y: Any, cfg: dict[str, Any], model: str, data: str,
              progress: bool) -> Report:
    """The analyses of ``cfg["analyses"]`` as steps of ``runner`` (``alignment``, ``hessian``,
    ``collapse``, ``singularities``, ``expansion``; each keyed on :func:`step_deps`), then the
    report (results.json with ``provenance`` = the runner's key parts, figures, report.md) and its
    CSV tables (:func:`write_analysis_tables`). A step whose analysis refuses the model or the data
    (no layers of units, no plain run, no stage among the selected blocks, ...) is a one-line
    UsageError naming it (:func:`_result_step`)."""
    n_align, n_hess, kk, p, q = cfg["samples"], cfg["batch"], cfg["k"], cfg["oversample"], cfg["power_iters"]
    nv, m, tp, sd, C, chosen, which = (cfg["probes"], cfg["steps"], cfg["trace_probes"], cfg["seed"],
                                       cfg["num_classes"], cfg["params"], cfg["analyses"])
    sel = _selected_indices(net, cfg.get("blocks"))
    xs, ys = x[:n_align], y[:n_align]
    results: dict[str, Any] = {"study": "analyze", "config": cfg, "provenance": dict(runner.key_parts),
                               "models": {"model": {}}}
    summaries: dict[str, dict[str, dict[str, float]]] = {"model": {}}
    figures: list[FigureSpec] = []
    entry = results["models"]["model"]
    if "alignment" in which:
        def run_align() -> Any:
            return alignment_analysis.residual_alignment(net, xs, kk, ys, blocks=sel, per_stage=True, num_classes=C,
                                                         oversample=p, power_iters=q, seed=sd,
                                                         deterministic=cfg["deterministic"])

        entry["alignment"] = al = _result_step(runner, "alignment", cfg, run_align)
        summaries["model"]["alignment"] = al["summary"]
        figures += stage_figures(al)
    if "hessian" in which:
        def run_hess() -> Any:
            named = dict(net.named_parameters())
            dim = sum(t.numel() for n, t in named.items() if t.requires_grad and (
                chosen is None or any(n == c or n.startswith(c + ".") for c in chosen)))
            return spectrum_analysis.hessian_spectrum(net, loss_function(cfg.get("loss", "ce")), (x[:n_hess], y[:n_hess]),
                                                      params=chosen, k=cfg.get("eigs", 2), probes=nv, steps=min(m, dim),
                                                      trace_probes=tp, seed=sd, progress=progress,
                                                      deterministic=cfg["deterministic"])

        entry["spectrum"] = hs = _result_step(runner, "hessian", cfg, run_hess)
        summaries["model"]["spectrum"] = hs["summary"]
        figures.append(density_figure(["model"]))
    if "collapse" in which:
        layers = None if sel is None else [b + 1 for b in sel]  # h_l = the output of block l - 1

        def run_collapse() -> dict[str, Any]:
            r = collapse_analysis.collapse(net, (xs, ys), num_classes=C, layers=layers)
            # the blocks whose outputs h_1..h_L are (the CSV table names them)
            return {"result": r.to_dict(), "summary": r.summary(),
                    "block_names": [i.name for i in residual_blocks(net, required=False)]}

        entry["collapse"] = co = _result_step(runner, "collapse", cfg, run_collapse)
        summaries["model"]["collapse"] = co["summary"]
        figures.append(collapse_figure(["model"]))
    if "singularities" in which:
        entry["singularities"] = si = _result_step(runner, "singularities", cfg, lambda: (
            singularities_analysis.singularities(net, (xs, ys))))
        summaries["model"]["singularities"] = si["summary"]
        figures.append(singularities_figure())
    if "expansion" in which:
        entry["expansion"] = ex = _result_step(runner, "expansion", cfg, lambda: _expansion(net, xs, sel, sd))
        summaries["model"]["expansion"] = ex["summary"]
        figures.append(expansion_figure(len(ex["runs"])))
    write_analysis_tables(runner, results)
    done = ", ".join(which)
    return write_study_report(runner, f"resgeom analyze: {model}", results, figures,
                              intro=f"{done} of {model} on {data} (resgeom analyze; docs/science.md defines every "
                                    f"measurement).",
                              summaries=summaries, config=cfg)


def write_analysis_tables(runner: Runner, results: dict[str, Any]) -> list[str]:
    """The CSV tables of ``results`` (:mod:`resgeom_fast.experiments.tables`: alignment.csv,
    hessian.csv) written atomically next to results.json, recorded in the manifest first; a table
    of an analysis not in this run that an earlier run wrote there is removed (it would describe
    other results than results.json). The paths written (none on a rank other than 0 of a
    multi-process run: rank 0 alone writes the folder)."""
    if not runner.is_writer:
        return []
    planned = {fname: os.path.join(runner.out, fname) for fname in tables.TABLE_FILES.values()}
    present = {fname for fname in tables.analysis_tables(results)}
    runner.record_written(*[planned[f] for f in present])
    written = tables.write_tables(runner.out, results)
    ours = set(runner.written)
    for fname, path in planned.items():
        if fname not in present and fname in ours and os.path.isfile(path):
            os.remove(path)
    return written


COMMAND = register_command(Command("analyze", "alignment, Hessian spectrum, collapse, singularities and path "
                                   "expansion of your model on your data",
                                   add_arguments))
