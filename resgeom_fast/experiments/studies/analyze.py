"""``resgeom analyze``: residual alignment per stage and the Hessian spectrum of a user's model
(a torchvision or timm ResNet or ``module:pkg.mod:factory``), with a checkpoint and data of the user's.

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
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

# modules, not functions: calls go through the analysis modules (see _shared)
from resgeom_fast.analysis import alignment as alignment_analysis
from resgeom_fast.analysis import spectrum as spectrum_analysis
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
from ..report import FigureSpec, Report
from ..runner import Runner
from .. import tables
from ._figures import density_figure, stage_figures
from ._registry import Command, register_command

__all__ = ["COMMAND", "AnalyzeSetup", "add_arguments", "analyze_data", "check_model_takes", "factory_key",
           "import_user_module", "load_checkpoint", "load_model", "load_timm_model", "prepare", "run_steps",
           "write_analysis_tables"]


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
    a.add_argument("--samples", default="8", help="inputs for the alignment analysis (default 8)")
    a.add_argument("--batch", default="32", help="samples of the Hessian's loss (default 32)")
    a.add_argument("--k", default=None, help="singular triplets per block (default C + 5)")
    a.add_argument("--power-iters", default="auto",
                   help="randomized SVD power iterations: auto (default; iterate until the error bound meets the "
                        "tolerance) or a fixed count")
    a.add_argument("--oversample", default="10", help="randomized SVD oversampling (default 10)")
    a.add_argument("--probes", default="4", help="SLQ probes of the Hessian density (default 4)")
    a.add_argument("--steps", default="30", help="Lanczos steps per SLQ probe (default 30)")
    a.add_argument("--trace-probes", default="12", help="Hutch++ products for the trace (default 12)")
    a.add_argument("--params", default=None,
                   help="comma list of parameter / module names spanning the Hessian (default: all; e.g. layer4,fc)")
    a.add_argument("--analyses", default="alignment,hessian", help="comma list of alignment, hessian")
    a.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    a.add_argument("--seed", default="0",
                   help="seed of the model's initialisation (without --checkpoint), the data sample and the probes "
                        "(default 0)")
    a.add_argument("--out", default="reports/analyze", help="report folder (default reports/analyze)")


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
            steps: Any = 30, trace_probes: Any = 12, analyses: str = "alignment,hessian", device: str = "cpu",
            seed: Any = 0, out: str = "reports/analyze", params: Optional[str] = None,
            deterministic: bool = False, image_size: Any = None, normalize: Optional[str] = None) -> AnalyzeSetup:
    """Check every flag (as written on the command line or as Python values), ``--out``, the
    model, the checkpoint and the data, in this order; a :class:`UsageError` for the first that
    cannot work. See :func:`resgeom_fast.experiments.commands.analyze` for the arguments.

    The setup's ``key_parts``: the sha256 of the ``--checkpoint`` file's contents, the model code
    (torchvision's or timm's version, or the sha256 of the factory's source and of its module file) and the
    data files (:func:`~resgeom_fast.experiments.common.data_key_parts`: for imagefolder:PATH the
    folder's file list and the contents of the images read, for tensors:FILE.pt the file).

    ``image_size`` (an int >= 1) and ``normalize`` ("imagenet" or "none"; None: "imagenet") apply
    to imagefolder data only (a UsageError with another ``data``); both enter the configuration.
    """
    C = int_flag("--num-classes", num_classes, 2)
    n_align, n_hess = int_flag("--samples", samples, 1), int_flag("--batch", batch, 1)
    kk = None if k is None else int_flag("--k", k, 1)
    try:
        q = "auto" if str(power_iters).strip().lower() == "auto" else int_flag("--power-iters", power_iters, 0)
    except UsageError:
        raise UsageError(f"--power-iters: expected auto or an int >= 0, got {power_iters!r}") from None
    p = int_flag("--oversample", oversample, 0)
    nv, m, tp = (int_flag("--probes", probes, 1), int_flag("--steps", steps, 2),
                 int_flag("--trace-probes", trace_probes, 3))
    sd = int_flag("--seed", seed, 0)
    which = [a.strip() for a in analyses.split(",") if a.strip()]
    bad = [a for a in which if a not in ("alignment", "hessian")]
    if bad or not which:
        raise UsageError(f"--analyses: unknown analysis {bad}; allowed: alignment, hessian")
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
    n = max(n_align, n_hess)
    # the user's files are hashed first (the key describes the bytes read next): for an image
    # folder its file list and the images the first n of the --seed permutation pick (the
    # same n whichever analyses run, so adding one does not re-key the others)
    data_key = data_key_parts(data, samples=n, seed=sd)
    need = max(n_align if "alignment" in which else 1, n_hess if "hessian" in which else 1)
    x, y = analyze_data(data, n, C, sd, image_size=size, normalize=normalize, need=need)
    if x.dim() == 2:
        raise UsageError("--data: analyze expects image data [N, C, H, W] for this model")
    x, y = x.to(dev), y.to(dev)
    check_model_takes(net, model, x, data, C)
    cfg = {"model": model, "checkpoint": os.path.abspath(checkpoint) if checkpoint else None, "data": data,
           "num_classes": C, "samples": n_align, "batch": n_hess, "k": kk, "power_iters": q, "oversample": p,
           "probes": nv, "steps": m, "trace_probes": tp, "analyses": which, "device": device, "seed": sd, "params": chosen,
           "deterministic": bool(deterministic), "image_size": size,
           "normalize": ("imagenet" if normalize is None else normalize) if data.startswith("imagefolder:") else None}
    key_parts = {**key_parts, **data_key}
    return AnalyzeSetup(net, x, y, cfg, key_parts)


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


def run_steps(runner: Runner, net: Any, x: Any, y: Any, cfg: dict[str, Any], model: str, data: str,
              progress: bool) -> Report:
    """The analyses of ``cfg["analyses"]`` as steps ``alignment`` / ``hessian`` of ``runner``,
    then the report (results.json with ``provenance`` = the runner's key parts, figures, report.md)
    and its CSV tables (alignment.csv, hessian.csv: :func:`write_analysis_tables`)."""
    n_align, n_hess, kk, p, q = cfg["samples"], cfg["batch"], cfg["k"], cfg["oversample"], cfg["power_iters"]
    nv, m, tp, sd, C, chosen, which = (cfg["probes"], cfg["steps"], cfg["trace_probes"], cfg["seed"],
                                       cfg["num_classes"], cfg["params"], cfg["analyses"])
    results: dict[str, Any] = {"study": "analyze", "config": cfg, "provenance": dict(runner.key_parts),
                               "models": {"model": {}}}
    summaries: dict[str, dict[str, dict[str, float]]] = {"model": {}}
    figures: list[FigureSpec] = []
    if "alignment" in which:
        def run_align() -> dict[str, Any]:
            r = alignment_analysis.residual_alignment(net, x[:n_align], kk, y[:n_align], per_stage=True,
                                                      num_classes=C, oversample=p, power_iters=q, seed=sd,
                                                      deterministic=cfg["deterministic"])
            return {"result": r.to_dict(), "summary": r.summary()}

        al = runner.step("alignment", run_align)
        results["models"]["model"]["alignment"] = al
        summaries["model"]["alignment"] = al["summary"]
        figures += stage_figures(al)
    if "hessian" in which:
        def run_hess() -> dict[str, Any]:
            sel = dict(net.named_parameters())
            dim = sum(t.numel() for n, t in sel.items() if t.requires_grad and (
                chosen is None or any(n == c or n.startswith(c + ".") for c in chosen)))
            r = spectrum_analysis.hessian_spectrum(net, F.cross_entropy, (x[:n_hess], y[:n_hess]), params=chosen,
                                                   k=2, probes=nv, steps=min(m, dim), trace_probes=tp, seed=sd,
                                                   progress=progress, deterministic=cfg["deterministic"])
            return {"result": r.to_dict(), "summary": r.summary()}

        hs = runner.step("hessian", run_hess)
        results["models"]["model"]["spectrum"] = hs
        summaries["model"]["spectrum"] = hs["summary"]
        figures.append(density_figure(["model"]))
    write_analysis_tables(runner, results)
    return write_study_report(runner, f"resgeom analyze: {model}", results, figures,
                              intro=f"Residual alignment per stage and Hessian spectrum of {model} on {data}.",
                              summaries=summaries, config=cfg)


def write_analysis_tables(runner: Runner, results: dict[str, Any]) -> list[str]:
    """The CSV tables of ``results`` (:mod:`resgeom_fast.experiments.tables`: alignment.csv,
    hessian.csv) written atomically next to results.json, recorded in the manifest first; a table
    of an analysis not in this run that an earlier run wrote there is removed (it would describe
    other results than results.json). The paths written."""
    planned = {fname: os.path.join(runner.out, fname) for fname in tables.TABLE_FILES.values()}
    present = {fname for fname in tables.analysis_tables(results)}
    runner.record_written(*[planned[f] for f in present])
    written = tables.write_tables(runner.out, results)
    ours = set(runner.written)
    for fname, path in planned.items():
        if fname not in present and fname in ours and os.path.isfile(path):
            os.remove(path)
    return written


COMMAND = register_command(Command("analyze", "alignment per stage and the Hessian spectrum of your model",
                                   add_arguments))
