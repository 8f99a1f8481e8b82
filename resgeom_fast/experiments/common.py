"""Shared pieces of the studies: devices, data sets by name, models from specs, resumable training."""
from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

# packages, not functions: calls go through them, so that a wrapper installed on
# resgeom_fast.train.train (the tests' spies) sees every training
from resgeom_fast import data as rdata
from resgeom_fast import models
from resgeom_fast import train as rtrain
from resgeom_fast.core.checks import value_error
from resgeom_fast.core.io import file_sha256
from resgeom_fast.train.checkpoint import CHECKPOINT_NAME, CheckpointCorruptError, read_checkpoint

from .config import UsageError
from .runner import Runner

__all__ = ["DATASETS_HELP", "IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATIONS", "USER_DATA_HELP", "build_model",
           "data_key_parts", "imagefolder_transform", "load_data", "load_imagefolder", "load_tensors", "move_aside",
           "resolve_device", "sample_indices", "train_step", "verified_checkpoint"]

DATASETS_HELP = "digits | gaussian_mixture | torchvision:NAME:ROOT (NAME in mnist, fashionmnist, cifar10, cifar100)"
USER_DATA_HELP = "imagefolder:PATH | tensors:FILE.pt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("imagenet", "none")


def resolve_device(name: str) -> torch.device:
    """"cpu", "cuda" or "cuda:N"; a UsageError when CUDA is asked for but not visible."""
    if not isinstance(name, str) or not (name == "cpu" or name == "cuda" or name.startswith("cuda:")):
        raise UsageError(f"device: expected one of ['cpu', 'cuda', 'cuda:N'], got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device: {name!r} asked for but no CUDA GPU is visible; use --device cpu")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise UsageError(f"device: expected one of ['cpu', 'cuda', 'cuda:N'], got {name!r}") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device: {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        return dev
    return torch.device("cpu")


def load_data(spec: str, *, image: bool = False, n_train: Optional[int] = None, n_test: Optional[int] = None,
              seed: int = 0):
    """A :class:`resgeom_fast.data.Dataset` by name.

    Args:
        spec: "digits", "gaussian_mixture" (10 classes in 64 dimensions) or
            "torchvision:NAME:ROOT" (MNIST / FashionMNIST / CIFAR from a local folder, never
            downloaded).
        image: keep image inputs [N, C, H, W] (conv nets); False flattens them (FC nets).
        n_train, n_test: keep only the first samples of each split (None: all).
        seed: split seed of digits, draw seed of the mixture.
    """
    if spec == "digits":
        ds = rdata.digits(seed=seed, image=image)
    elif spec == "gaussian_mixture":
        if image:
            raise UsageError("dataset: gaussian_mixture has no image form; use model=fc")
        ds = rdata.gaussian_mixture(num_classes=10, dim=64, n=1500, separation=4.0, seed=seed, n_test=500)
    elif spec.startswith("torchvision:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[2]:
            raise UsageError(f"dataset: expected torchvision:NAME:ROOT, got {spec!r}")
        name, root = parts[1].lower(), parts[2]
        if name not in rdata.VISION_DATASETS:
            raise UsageError(f"dataset: unknown torchvision data set {parts[1]!r}; allowed: {', '.join(rdata.VISION_DATASETS)}")
        missing = [f for f in rdata.expected_files(name, root) if not os.path.isfile(f)]
        if missing:
            raise UsageError(f"dataset: {name} files not found under {root!r} (nothing is downloaded); "
                             f"missing {len(missing)} file(s), e.g. {missing[0]}")
        try:
            ds = rdata.torchvision_dataset(name, root, image=image, n_train=n_train, n_test=n_test)
        except RuntimeError as err:
            raise UsageError(f"dataset: {str(err).splitlines()[0]}") from None
        return ds
    else:
        raise UsageError(f"dataset: unknown data set {spec!r}; allowed: {DATASETS_HELP}")
    if not image:
        ds = ds.flat()
    if n_train is not None or n_test is not None:
        ds = ds.subset(n_train, n_test)
    return ds


def data_key_parts(spec: Any, *, samples: Optional[int] = None, seed: int = 0) -> dict[str, str]:
    """What a run's steps must be keyed on for the data set ``spec`` beyond its name, so that
    replaced data recomputes every step:

    - "torchvision:NAME:ROOT": ``data files sha256``, of the files read;
    - "tensors:FILE.pt": ``data files sha256``, of the file;
    - "imagefolder:PATH": ``data file list sha256`` (every image's path relative to PATH and its
      class, in ImageFolder's sorted order: it decides which images are drawn) and ``data files
      sha256`` (the contents of the images read: the first ``samples`` of
      :func:`sample_indices` with ``seed``; every image when ``samples`` is None);
    - {} for the built-in and generated data sets (their code is covered by the library version),
      and for a spec that cannot be read (its loader raises the error).
    """
    if isinstance(spec, str) and spec.startswith("tensors:"):
        path = spec.split(":", 1)[1]
        return {"data files sha256": file_sha256(path)} if os.path.isfile(path) else {}
    if isinstance(spec, str) and spec.startswith("imagefolder:"):
        try:
            listing = _imagefolder_listing(spec)
        except UsageError:
            return {}
        root, files = listing
        chosen = range(len(files)) if samples is None else sample_indices(len(files), samples, seed)
        names, contents = hashlib.sha256(), hashlib.sha256()
        for rel, label in files:
            names.update(f"{label}\t{rel}\n".encode())
        for i in chosen:
            contents.update(f"{files[i][0]}:{file_sha256(os.path.join(root, files[i][0]))}\n".encode())
        return {"data file list sha256": names.hexdigest(), "data files sha256": contents.hexdigest()}
    if not isinstance(spec, str) or not spec.startswith("torchvision:"):
        return {}
    parts = spec.split(":", 2)
    if len(parts) != 3:
        return {}
    name = parts[1].lower()
    if name not in rdata.VISION_DATASETS:
        return {}
    files = [f for f in rdata.expected_files(name, parts[2]) if os.path.isfile(f)]
    if not files:
        return {}
    h = hashlib.sha256()
    for f in files:
        h.update(f"{os.path.basename(f)}:{file_sha256(f)}\n".encode())
    return {"data files sha256": h.hexdigest()}


# -------------------------------------------------------------------- the user's own data
def sample_indices(total: int, n: int, seed: int) -> list[int]:
    """Which of ``total`` samples a command reads when it needs ``n``: the first ``min(n, total)``
    entries of ``torch.randperm(total)`` drawn from a CPU generator seeded with ``seed`` (so the
    draw mixes the classes of a class-sorted folder, and a larger ``n`` extends a smaller one)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(int(total), generator=gen)[:max(0, min(int(n), int(total)))].tolist()


def _torchvision(flag: str):
    try:  # torchvision is optional (pip install resgeom_fast[vision])
        import torchvision
    except ImportError:
        raise UsageError(f"{flag}: torchvision is not installed (pip install torchvision)") from None
    return torchvision


def _imagefolder_root(spec: str) -> str:
    root = spec.split(":", 1)[1]
    if not root:
        raise UsageError(f"--data: expected imagefolder:PATH, got {spec!r}")
    if not os.path.isdir(root):
        raise UsageError(f"--data {spec}: folder not found: {root!r}")
    return root


def _imagefolder_listing(spec: str) -> tuple[str, list[tuple[str, int]]]:
    """(root, [(path relative to root, class index)]) in torchvision ImageFolder's order (classes
    = the sorted subfolders, files sorted within each); a one-line UsageError for an empty folder."""
    root = _imagefolder_root(spec)
    tv = _torchvision("--data imagefolder")
    try:
        classes, to_idx = tv.datasets.folder.find_classes(root)
        samples = tv.datasets.folder.make_dataset(root, to_idx, extensions=tv.datasets.folder.IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"--data {spec}: no images found ({first[:200]}); expected one subfolder of images per "
                         f"class, e.g. {os.path.join(root, 'cat', '1.png')}") from None
    return root, [(os.path.relpath(p, root), int(c)) for p, c in samples]


def imagefolder_transform(image_size: Optional[int] = None, normalize: str = "imagenet"):
    """The transform analyze applies to ImageFolder images: ``Resize(image_size)`` (shorter side)
    then ``CenterCrop(image_size)`` when ``image_size`` is given (else the images keep their own
    size, which they must share), ``ToTensor()`` (RGB in [0, 1], float32 [3, H, W]), then
    ``Normalize(IMAGENET_MEAN, IMAGENET_STD)`` for ``normalize="imagenet"`` (nothing for "none")."""
    tv = _torchvision("--data imagefolder")
    T = tv.transforms
    steps = [T.Resize(image_size), T.CenterCrop(image_size)] if image_size else []
    steps.append(T.ToTensor())
    if normalize == "imagenet":
        steps.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    elif normalize != "none":
        raise UsageError(f"--normalize: expected one of {list(NORMALIZATIONS)}, got {normalize!r}")
    return T.Compose(steps)


def load_imagefolder(spec: str, n: int, *, seed: int = 0, image_size: Optional[int] = None,
                     normalize: str = "imagenet", need: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [m, 3, S, S] float32, y [m] int64) from "imagefolder:PATH": the images
    :func:`sample_indices` picks (m = min(n, images)) through torchvision's ImageFolder with
    :func:`imagefolder_transform`; labels are ImageFolder's class indices (sorted subfolder
    names). A UsageError when the folder holds fewer than ``need`` images (default ``n``), an
    image cannot be read, or the images differ in size without ``image_size``."""
    root, files = _imagefolder_listing(spec)
    need = n if need is None else need
    if len(files) < need:
        raise UsageError(f"--data {spec}: {len(files)} images, fewer than the {need} the analyses ask for "
                         "(lower --samples / --batch)")
    tv = _torchvision("--data imagefolder")
    ds = tv.datasets.ImageFolder(root, transform=imagefolder_transform(image_size, normalize))
    xs, ys = [], []
    for i in sample_indices(len(files), n, seed):
        try:
            img, label = ds[i]
        except Exception as err:  # noqa: BLE001 - any unreadable image is bad input
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise UsageError(f"--data {spec}: cannot read image {files[i][0]!r} ({type(err).__name__}: {first})") from None
        xs.append(img)
        ys.append(label)
    sizes = sorted({tuple(t.shape[1:]) for t in xs})
    if len(sizes) > 1:
        raise UsageError(f"--data {spec}: the images differ in size ({sizes[0][0]}x{sizes[0][1]} and "
                         f"{sizes[-1][0]}x{sizes[-1][1]}); pass --image-size N (e.g. 224 for ImageNet models)")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def load_tensors(spec: str, n: int, *, seed: int = 0, need: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [m, ...], y [m] int64) from "tensors:FILE.pt", a file written by ``torch.save`` of a dict
    ``{"x": Tensor, "y": Tensor}`` or a tuple / list ``(x, y)``: x floating point [N, ...], y
    integer class labels [N]. The rows :func:`sample_indices` picks (m = min(n, N)); a UsageError
    naming what the file holds otherwise, or when N < ``need`` (default ``n``)."""
    path = spec.split(":", 1)[1]
    where = f"--data {spec}"
    if not path:
        raise UsageError(f"--data: expected tensors:FILE.pt, got {spec!r}")
    if not os.path.isfile(path):
        raise UsageError(f"{where}: file not found: {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is bad input
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"{where}: cannot read {path!r} ({type(err).__name__}: {first})") from None
    expected = 'a dict {"x": Tensor, "y": Tensor} or a tuple (x, y) of tensors'
    if isinstance(obj, dict) and "x" in obj and "y" in obj:
        x, y = obj["x"], obj["y"]
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = obj
    else:
        raise UsageError(f"{where}: expected {expected}, got {_describe(obj)}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise UsageError(f"{where}: expected {expected}, got x {_describe(x)} and y {_describe(y)}")
    if not x.is_floating_point() or x.dim() < 2:
        raise UsageError(f"{where}: expected x a floating-point tensor [N, ...], got {x.dtype} {list(x.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1 or len(y) != len(x):
        raise UsageError(f"{where}: expected y integer class labels [{len(x)}], got {y.dtype} {list(y.shape)}")
    need = n if need is None else need
    if len(x) < need:
        raise UsageError(f"{where}: {len(x)} samples, fewer than the {need} the analyses ask for "
                         "(lower --samples / --batch)")
    idx = torch.tensor(sample_indices(len(x), n, seed), dtype=torch.int64)
    return x[idx].contiguous(), y[idx].to(torch.int64)


def _describe(obj: Any) -> str:
    """A short description of what a data file held (for error messages)."""
    if isinstance(obj, torch.Tensor):
        return f"a Tensor {obj.dtype} {list(obj.shape)}"
    if isinstance(obj, dict):
        keys: Sequence[Any] = list(obj)[:8]
        return f"a dict with keys {keys}" + (" ..." if len(obj) > 8 else "")
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)}"
    return f"a {type(obj).__name__}"


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """A model of this package from a JSON-friendly spec (``kind`` plus constructor arguments).

    kinds: "fc" (:class:`FCResNet`: in_dim, width, depth, num_classes, skip, hyper, norm, scale,
    seed, stochastic_depth), "conv" (:class:`ConvResNet`: in_channels instead of in_dim), "leaky"
    (:class:`LeakyResNet`: in_dim, width, depth, out_dim, leak, steps, lam, seed); an optional
    "dtype" ("float32" / "float64") casts the model.
    """

    kw = dict(spec)
    kind = kw.pop("kind")
    dtype = kw.pop("dtype", None)
    model = _build(kind, kw)
    return model.to(getattr(torch, dtype)) if dtype else model


def _build(kind: str, kw: dict[str, Any]) -> nn.Module:
    if kind == "fc":
        return models.FCResNet(kw.pop("in_dim"), kw.pop("width"), kw.pop("depth"), kw.pop("num_classes"), **kw)
    if kind == "conv":
        return models.ConvResNet(kw.pop("in_channels"), kw.pop("width"), kw.pop("depth"), kw.pop("num_classes"), **kw)
    if kind == "leaky":
        return models.LeakyResNet(kw.pop("in_dim"), kw.pop("width"), kw.pop("depth"), kw.pop("out_dim"),
                                  kw.pop("leak"), kw.pop("steps", "equidistant"), **kw)
    raise value_error("build_model", "spec kind", "one of ['fc', 'conv', 'leaky']", repr(kind))


def train_step(runner: Runner, name: str, spec: Mapping[str, Any], dataset: Any, data_key: Mapping[str, Any],
               train_kwargs: Mapping[str, Any], device: torch.device,
               regularizers: tuple = (), callbacks: tuple = ()) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``spec``, train it (step ``train_<name>``, checkpointed every epoch) and return it in
    eval mode with the step's result ``{"history": [...], "final": {...}}``.

    A finished step is not recomputed: the weights are loaded from its checkpoint, whose sha256
    must match the one the step recorded (the result holds ``checkpoint_sha256``); a checkpoint
    that is missing, changed or unreadable is moved aside (never deleted) with a message and the
    net is trained again. An interrupted training resumes from its last epoch (not with
    ``runner.fresh``). ``data_key`` describes the data (it enters the hash).
    """
    model = build_model(spec).to(device)
    deps = {"model": dict(spec), "data": dict(data_key), "train": dict(train_kwargs),
            "regularizers": [repr(r) for r in regularizers]}
    ckdir = runner.checkpoint_dir(name, deps)
    ckpt = os.path.join(ckdir, CHECKPOINT_NAME)
    step = f"train_{name}"
    if verified_checkpoint(runner, step, deps, ckpt, lambda path: read_checkpoint(path, "checkpoint")):
        try:
            rtrain.load_checkpoint(model, ckdir)
        except CheckpointCorruptError as err:  # pragma: no cover - the sha256 matched: damaged since
            moved = move_aside(runner, ckpt, "corrupt")
            runner.invalidate(step, f"{err}; moved it to {os.path.basename(moved)}")

    def fn() -> dict[str, Any]:
        kw = dict(train_kwargs)
        epochs = kw.pop("epochs")
        data = dataset.to(device=device) if hasattr(dataset, "to") else dataset

        def run():
            return rtrain.train(model, data, epochs, checkpoint_dir=ckdir, resume=not runner.fresh,
                                progress=runner.progress, regularizers=regularizers, callbacks=callbacks, **kw)

        try:
            res = run()
        except CheckpointCorruptError as err:  # raised before the model or the optimizer is touched
            moved = move_aside(runner, ckpt, "corrupt")
            runner.message(f"step {step}: {err}; moved it to {os.path.basename(moved)}, training from the start")
            res = run()
        return {"history": res.history, "final": res.final, "resumed_from": res.resumed_from,
                "checkpoint_sha256": file_sha256(ckpt)}

    out = runner.step(step, fn, deps=deps)
    return model.eval(), out


def verified_checkpoint(runner: Runner, step: str, deps: Mapping[str, Any], ckpt: str,
                        read: Callable[[str], Any]) -> bool:
    """Whether step ``step`` finished earlier with ``deps`` and ``ckpt`` is the file it wrote (the
    ``checkpoint_sha256`` its result recorded). Otherwise a changed or unreadable ``ckpt`` is moved
    aside (never deleted), the step is forgotten with a message, and False is returned: the caller
    computes it again. ``read(ckpt)`` raises when the file is damaged (it tells "corrupt" from
    "changed" in the message)."""
    done = runner.stored(step, deps)
    if done is None:
        return False
    sha = done.get("checkpoint_sha256") if isinstance(done, dict) else None
    if not os.path.isfile(ckpt):
        runner.invalidate(step, f"checkpoint missing in {os.path.dirname(ckpt)}")
        return False
    if sha is not None and file_sha256(ckpt) == sha:
        return True
    try:
        read(ckpt)
        why, reason = "changed", f"checkpoint {ckpt!r} is not the one this step wrote (sha256 differs)"
    except Exception as err:  # noqa: BLE001 - any unreadable file is a damaged checkpoint
        why, reason = "corrupt", (str(err).strip().splitlines() or [type(err).__name__])[0]
    moved = move_aside(runner, ckpt, why)
    runner.invalidate(step, f"{reason}; moved it to {os.path.basename(moved)}")
    return False


def move_aside(runner: Runner, path: str, why: str) -> str:
    """Rename ``path`` to ``path.<why>-<UTC time>`` (kept for inspection, recorded as resgeom's)
    and return the new path."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    new = f"{path}.{why}-{stamp}"
    os.replace(path, new)
    runner.record_written(new)
    return new
