"""A deterministic trainer with a JSONL log, atomic per-epoch checkpoints and exact resume.

Determinism. Everything random in a run derives from ``seed``: the trainer's own shuffling uses
a ``torch.Generator`` seeded from (seed, epoch), and the whole run executes inside
``torch.random.fork_rng`` with the global RNG seeded from ``seed`` (for models that draw from it,
e.g. dropout); the caller's global RNG state is restored afterwards. Checkpoints hold the model,
optimizer, scheduler, the global RNG state(s), the state of a user loader's generator, the epoch,
the optimizer step count, the history and a model fingerprint. A run resumed from the last
checkpoint (``resume=True``) therefore ends with bit-identical weights to an uninterrupted run
on the same device (CPU; on CUDA also set ``torch.use_deterministic_algorithms(True)``).
Callbacks run under their own ``fork_rng``, so measuring during training does not change it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from .._progress import progress as progress_bar
from ..core.checks import (
    ArgumentTypeError,
    ArgumentValueError,
    check_bool,
    check_choice,
    check_int,
    check_module,
    check_number,
)
from ..core.modules import module_mode
from ..data.dataset import Dataset
from .checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    CheckpointMismatchError,
    atomic_file,
    atomic_save,
    check_fingerprint,
    model_fingerprint,
    read_checkpoint,
)

__all__ = ["train", "TrainResult", "TrainState", "OPTIMIZERS", "SCHEDULES", "LOSSES"]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "multistep")
LOSSES: tuple[str, ...] = ("cross_entropy", "mse")
LOG_NAME = "log.jsonl"
# the configuration a resumed run must repeat (epochs may grow)
_RESUME_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "schedule", "batch_size", "drop_last", "seed",
                "loss_fn")


@dataclass
class TrainState:
    """What callbacks receive besides the epoch and the model.

    Attributes:
        epoch: epochs completed (0 before training).
        step: optimizer steps taken so far.
        history: one record per completed epoch (the JSONL lines).
        record: the record of this epoch (None at epoch 0); a callback may add JSON-able entries.
        optimizer, scheduler: the live objects.
        test_loader: the evaluation loader (None if there is no test split).
    """

    epoch: int
    step: int
    history: list[dict[str, Any]]
    record: Optional[dict[str, Any]]
    optimizer: torch.optim.Optimizer
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler]
    test_loader: Optional[Iterable]


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        history: one record per epoch (epoch, step, train_loss, train_reg, train_acc, test_loss,
            test_acc, lr, time, [callbacks]); accuracies are None for regression.
        model: the trained model (the same object that was passed in).
        checkpoint_path, log_path: where they were written (None if not).
        resumed_from: the checkpoint epoch this call started from (None for a fresh run).
    """

    history: list[dict[str, Any]]
    model: nn.Module
    checkpoint_path: Optional[str] = None
    log_path: Optional[str] = None
    resumed_from: Optional[int] = None

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's record ({} if no epoch ran)."""
        return self.history[-1] if self.history else {}

    def to_dict(self) -> dict[str, Any]:
        return {"history": self.history, "checkpoint_path": self.checkpoint_path, "log_path": self.log_path,
                "resumed_from": self.resumed_from}


# --------------------------------------------------------------------------- data
class _TrainData:
    """Normalised view of the accepted ``data`` forms."""

    def __init__(self, data: Any, batch_size: int, eval_batch_size: int, seed: int, drop_last: bool) -> None:
        self.seed = seed
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.user_loader: Optional[DataLoader] = None
        self.train_set: Optional[TensorDataset] = None
        self.test_loader: Optional[Iterable] = None
        if isinstance(data, Dataset):
            self.train_set = TensorDataset(data.x_train, data.y_train)
            self.test_loader = data.loader("test", batch_size=eval_batch_size, shuffle=False)
            return
        if isinstance(data, (tuple, list)):
            items = list(data)
            if len(items) == 2 and isinstance(items[0], Iterable) and not isinstance(items[0], Tensor) \
                    and (items[1] is None or (isinstance(items[1], Iterable) and not isinstance(items[1], Tensor))):
                self.user_loader = items[0]
                self.test_loader = items[1]
                return
            if len(items) in (2, 4) and all(isinstance(t, Tensor) for t in items):
                self.train_set = TensorDataset(items[0], items[1])
                if len(items) == 4:
                    self.test_loader = DataLoader(TensorDataset(items[2], items[3]), batch_size=eval_batch_size)
                return
        raise ArgumentTypeError(
            "data: expected a resgeom_fast.data.Dataset, a (train_loader, test_loader_or_None) pair, "
            f"(x, y) tensors or (x_train, y_train, x_test, y_test) tensors, got {type(data).__name__}")

    def train_loader(self, epoch: int) -> Iterable:
        """Batches of epoch ``epoch`` (1-based); the trainer's own loaders reshuffle by (seed, epoch)."""
        if self.user_loader is not None:
            return self.user_loader
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        drop = self.drop_last and len(self.train_set) > self.batch_size
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen, drop_last=drop)

    def loader_rng_state(self) -> Optional[Tensor]:
        gen = getattr(self.user_loader, "generator", None)
        return gen.get_state() if isinstance(gen, torch.Generator) else None

    def set_loader_rng_state(self, state: Optional[Tensor]) -> None:
        gen = getattr(self.user_loader, "generator", None)
        if state is not None and isinstance(gen, torch.Generator):
            gen.set_state(state)


# --------------------------------------------------------------------------- helpers
def _check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    """``"<name>: expected one of [...], got <value>"`` (ArgumentValueError) unless ``value`` is allowed."""
    check_choice(None, name, value, allowed)


def _make_optimizer(name: str, params: list[nn.Parameter], lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _make_scheduler(schedule: Union[str, Callable[[int], float]], optimizer: torch.optim.Optimizer,
                    epochs: int) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    if callable(schedule):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if schedule == "constant":
        return None
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    milestones = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def _parse_callbacks(callbacks: Sequence[Any]) -> list[tuple[Callable[[int], bool], Callable, str]]:
    """(when(epoch) -> bool, fn(epoch, model, state), name) for every accepted callback form."""
    parsed = []
    for i, cb in enumerate(callbacks):
        when: Any = None
        if isinstance(cb, tuple) and len(cb) == 2 and callable(cb[1]):
            when, fn = cb
        elif hasattr(cb, "on_epoch_end") and callable(cb.on_epoch_end):
            when, fn = getattr(cb, "epochs", None), cb.on_epoch_end
        elif callable(cb):
            fn = cb
        else:
            raise ArgumentTypeError(f"callbacks[{i}]: expected a callable, an object with on_epoch_end, or "
                             f"(epochs, callable), got {cb!r}")
        if when is None:
            test = (lambda e: e >= 1)
        elif isinstance(when, int) and not isinstance(when, bool):
            if when < 1:
                raise ArgumentValueError(f"callbacks[{i}]: expected an every-k-epochs int >= 1, got {when!r}")
            test = (lambda e, k=when: e >= 1 and e % k == 0)
        elif isinstance(when, Iterable):
            chosen = frozenset(int(e) for e in when)
            test = (lambda e, s=chosen: e in s)
        else:
            raise ArgumentTypeError(f"callbacks[{i}]: expected epochs as an int (every k) or a list of ints, got {when!r}")
        name = getattr(fn, "__name__", None) or type(cb).__name__
        if name == "on_epoch_end":
            name = type(cb).__name__
        parsed.append((test, fn, f"{name}" if name else f"callback{i}"))
    return parsed


def _data_loss(loss_fn: Union[str, Callable], output: Tensor, target: Tensor) -> Tensor:
    if loss_fn == "cross_entropy":
        return F.cross_entropy(output, target)
    if loss_fn == "mse":
        return (target - output).pow(2).sum() / output.shape[0]
    return loss_fn(output, target)


def _resolve_loss(loss_fn: Union[None, str, Callable], target: Tensor) -> Union[str, Callable]:
    if loss_fn is None:
        return "mse" if target.is_floating_point() else "cross_entropy"
    if isinstance(loss_fn, str):
        _check_choice("loss_fn", loss_fn, LOSSES)
        return loss_fn
    if callable(loss_fn):
        return loss_fn
    raise ArgumentTypeError(f"loss_fn: expected None, a callable or one of {list(LOSSES)}, got {loss_fn!r}")


def _correct(output: Tensor, target: Tensor) -> Optional[Tensor]:
    """The number of correct argmax predictions, an int64 0-dim tensor on the output's device (no
    host sync: the epoch's sums are read once), or None when there is no accuracy (float targets,
    outputs not [N, C])."""
    if target.is_floating_point() or output.dim() != 2:
        return None
    return (output.argmax(1) == target).sum()


def _epoch_sums(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Zero (loss, regulariser, correct) sums of an epoch on ``device`` (float64, float64, int64):
    each batch adds ``value.double() * n`` there, the same float64 operations in the same order as
    a Python float sum of ``float(value) * n`` (bit for bit), read once at the end of the epoch."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return zero, zero.clone(), torch.zeros((), dtype=torch.int64, device=device)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, Tensor):
        return obj.tolist()
    return str(obj)


def _write_log(path: str, history: list[dict[str, Any]], rewrite: bool) -> None:
    """Append the last record, or (``rewrite``) atomically rewrite the file from ``history``."""
    if rewrite:
        with atomic_file(path, "w") as fh:
            for rec in history:
                fh.write(json.dumps(rec, default=_json_default) + "\n")
        return
    with open(path, "a") as fh:
        fh.write(json.dumps(history[-1], default=_json_default) + "\n")
        fh.flush()


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


# --------------------------------------------------------------------------- train
def train(
    model: nn.Module,
    data: Any,
    epochs: int,
    *,
    optimizer: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: Union[str, Callable[[int], float]] = "constant",
    batch_size: int = 128,
    eval_batch_size: int = 1024,
    drop_last: bool = True,
    seed: int = 0,
    loss_fn: Union[None, str, Callable[[Tensor, Tensor], Tensor]] = None,
    regularizers: Sequence[Callable[[nn.Module], Tensor]] = (),
    checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    log_path: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
    adapt_every: Optional[int] = None,
) -> TrainResult:
    """Train ``model`` for ``epochs`` epochs, deterministically given ``seed``.

    Args:
        model: any ``nn.Module`` mapping a batch x to outputs (this package's models or others);
            it is trained in place on the device of its parameters.
        data: one of
            - a :class:`resgeom_fast.data.Dataset` (train split shuffled by the trainer, test split
              evaluated each epoch) -- the recommended form;
            - ``(x, y)`` tensors (train only) or ``(x_train, y_train, x_test, y_test)`` tensors;
            - ``(train_loader, test_loader)``: any iterables of ``(x, y)`` batches, test may be
              None; exact resume then relies on the loader's own generator (saved) or the global
              RNG (saved).
        epochs: total epochs (a resumed run continues up to this number).
        optimizer: "sgd" (with ``momentum``) | "adam" | "adamw".
        lr, momentum, weight_decay: optimizer settings (weight_decay is the optimizer's own).
        schedule: "constant" | "cosine" (to 0 at ``epochs``) | "multistep" (x0.1 at 50% and 75%)
            | a callable epoch -> lr factor (LambdaLR); the scheduler steps once per epoch.
        batch_size, eval_batch_size: batch sizes for the trainer's own loaders.
        drop_last: the trainer's own train loader drops the incomplete last batch (when the
            train split is larger than one batch). Each epoch reshuffles, so every sample is
            still used; a tiny last batch would otherwise corrupt BatchNorm statistics (on
            digits, 1347 = 21 * 64 + 3, it costs several points of test accuracy).
        seed: the only source of randomness of the run (shuffling, global RNG inside the run).
        loss_fn: None (cross-entropy for integer targets, "mse" for float targets), "cross_entropy",
            "mse" (= (1/N) ||Y - output||_F^2 per batch) or a callable (output, target) -> scalar.
            If the model has a ``regularization()`` method (LeakyResNet), its value is added to the
            training objective.
        regularizers: callables model -> scalar tensor added to the objective (e.g. ``BiasReg``).
        checkpoint_dir: if given, ``checkpoint.pt`` is written there atomically after every epoch
            and the JSONL log defaults to ``log.jsonl`` there.
        resume: continue from ``checkpoint_dir/checkpoint.pt`` when it exists (fresh start
            otherwise). The checkpoint must come from the same model (fingerprint) and the same
            configuration (optimizer, lr, momentum, weight_decay, schedule, batch_size, seed,
            loss_fn); otherwise :class:`CheckpointMismatchError` (a ValueError). A checkpoint that
            cannot be read raises :class:`~resgeom_fast.train.checkpoint.CheckpointCorruptError`
            (a CheckpointMismatchError) naming the file.
        callbacks: each one of
            - ``(every_k, fn)`` -- fn called after epochs k, 2k, ...;
            - ``(epochs_list, fn)`` -- after the listed epochs; 0 means before training starts
              (fresh runs only);
            - an object with ``on_epoch_end(epoch, model, state)`` (and optionally an ``epochs``
              attribute of either form above; default every epoch);
            - a plain callable -- after every epoch.
            ``fn(epoch, model, state: TrainState)``; a returned dict is stored in the epoch's
            record under ``record["callbacks"][name]``. Callbacks run after evaluation and
            before the checkpoint of that epoch, in their own ``fork_rng``; an exception raised
            by one stops training (the last checkpoint remains valid).
        log_path: JSONL log (one line per epoch: epoch, step, train_loss, train_reg, train_acc,
            test_loss, test_acc, lr, time); default ``checkpoint_dir/log.jsonl`` or none.
            On resume the file is rewritten from the checkpoint's history (no duplicates).
        progress: show a progress bar over epochs on stderr (:func:`resgeom_fast._progress.progress`:
            a tqdm bar on a terminal, one plain line per epoch (at most one per 5 s) otherwise).
        adapt_every: call ``model.adapt_steps(x_batch)`` every this many optimizer steps; None
            uses ``model.adapt_every`` when the model has adaptive steps (LeakyResNet
            ``steps="adaptive"``), else never.

    Returns:
        :class:`TrainResult` with the per-epoch history.
    """
    check_module(None, "model", model)
    check_int(None, "epochs", epochs, minimum=0, expected="an int >= 0")
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    if not callable(schedule):
        _check_choice("schedule", schedule, SCHEDULES)
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        check_number(None, name, value, nonnegative=True)
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        check_int(None, name, value, minimum=1, expected="an int >= 1")
    check_int(None, "seed", seed, minimum=0, expected="an int >= 0")
    if loss_fn is not None and not callable(loss_fn):
        _check_choice("loss_fn", loss_fn, LOSSES)
    if resume and checkpoint_dir is None:
        raise ArgumentValueError("resume: needs checkpoint_dir (where the checkpoint lives)")
    if adapt_every is not None and (isinstance(adapt_every, bool) or not isinstance(adapt_every, int) or adapt_every < 1):
        raise ArgumentValueError(f"adapt_every: expected None or an int >= 1, got {adapt_every!r}")
    parsed_callbacks = _parse_callbacks(list(callbacks))
    regularizers = list(regularizers)
    for i, reg in enumerate(regularizers):
        if not callable(reg):
            raise ArgumentTypeError(f"regularizers[{i}]: expected a callable model -> tensor, got {reg!r}")
    if adapt_every is None and getattr(model, "steps", None) == "adaptive" and hasattr(model, "adapt_steps"):
        adapt_every = int(getattr(model, "adapt_every", 10))
    model_reg = getattr(model, "regularization", None)
    model_reg = model_reg if callable(model_reg) else None

    check_bool(None, "drop_last", drop_last, expected="one of [False, True]")
    tdata = _TrainData(data, batch_size, eval_batch_size, seed, drop_last)
    params = [p for p in model.parameters() if p.requires_grad]
    first = next(model.parameters(), None)
    if first is None:
        raise ArgumentValueError("model: has no parameters to train")
    device = first.device
    opt = _make_optimizer(optimizer, params, float(lr), float(momentum), float(weight_decay))
    sched = _make_scheduler(schedule, opt, max(epochs, 1))
    config = {"optimizer": optimizer, "lr": float(lr), "momentum": float(momentum),
              "weight_decay": float(weight_decay), "schedule": schedule if isinstance(schedule, str) else "callable",
              "batch_size": batch_size, "drop_last": drop_last, "seed": seed,
              "loss_fn": loss_fn if (loss_fn is None or isinstance(loss_fn, str)) else "callable", "epochs": epochs}
    fingerprint = model_fingerprint(model)

    ckpt_path = None
    if checkpoint_dir is not None:
        os.makedirs(os.fspath(checkpoint_dir), exist_ok=True)
        ckpt_path = os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_NAME)
        if log_path is None:
            log_path = os.path.join(os.fspath(checkpoint_dir), LOG_NAME)
    log_path = os.fspath(log_path) if log_path is not None else None

    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        history: list[dict[str, Any]] = []
        start_epoch, step, resumed_from = 0, 0, None
        if resume and ckpt_path is not None and os.path.isfile(ckpt_path):
            ckpt = read_checkpoint(ckpt_path, "resume")
            check_fingerprint(ckpt["fingerprint"], model, source=f"checkpoint {ckpt_path!r}")
            for key in _RESUME_KEYS:
                if ckpt["config"].get(key) != config[key]:
                    raise CheckpointMismatchError(
                        f"resume: checkpoint {ckpt_path!r} was trained with {key}={ckpt['config'].get(key)!r}, "
                        f"this call has {key}={config[key]!r}")
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            if sched is not None and ckpt.get("scheduler") is not None:
                sched.load_state_dict(ckpt["scheduler"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
            tdata.set_loader_rng_state(ckpt["rng"].get("loader"))
            start_epoch, step, resumed_from = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt["epoch"])
            history = list(ckpt["history"])
            if log_path is not None:
                _write_log(log_path, history, rewrite=True)
        elif log_path is not None and os.path.exists(log_path) and not resume:
            os.remove(log_path)  # a fresh run starts a fresh log

        def state_for(epoch: int, record: Optional[dict[str, Any]]) -> TrainState:
            return TrainState(epoch=epoch, step=step, history=history, record=record, optimizer=opt,
                              scheduler=sched, test_loader=tdata.test_loader)

        def run_callbacks(epoch: int, record: Optional[dict[str, Any]]) -> None:
            for when, fn, name in parsed_callbacks:
                if not when(epoch):
                    continue
                with torch.random.fork_rng(devices=_rng_devices(device)):
                    out = fn(epoch, model, state_for(epoch, record))
                if isinstance(out, dict) and record is not None:
                    record.setdefault("callbacks", {})[name] = out

        if start_epoch == 0:
            run_callbacks(0, None)

        bar = progress_bar(epochs, "train", enabled=progress, unit="epoch", initial=min(start_epoch, epochs))
        resolved_loss: Optional[Union[str, Callable]] = None
        try:
            for epoch in range(start_epoch + 1, epochs + 1):
                t0 = time.perf_counter()
                lr_now = opt.param_groups[0]["lr"]
                model.train()
                loss_t, reg_t, correct_t = _epoch_sums(device)   # on the device: no host sync per batch
                seen, batches, has_acc = 0, 0, True
                for xb, yb in tdata.train_loader(epoch):
                    xb, yb = xb.to(device), yb.to(device)
                    if resolved_loss is None:
                        resolved_loss = _resolve_loss(loss_fn, yb)
                    opt.zero_grad(set_to_none=True)
                    out = model(xb)
                    data_loss = _data_loss(resolved_loss, out, yb)
                    reg = out.new_zeros(())
                    if model_reg is not None:
                        reg = reg + model_reg()
                    for r in regularizers:
                        reg = reg + r(model)
                    (data_loss + reg).backward()
                    opt.step()
                    step += 1
                    if adapt_every is not None and step % adapt_every == 0:
                        model.adapt_steps(xb)
                    n = xb.shape[0]
                    loss_t += data_loss.detach().double() * n
                    reg_t += reg.detach().double() * n
                    c = _correct(out.detach(), yb)
                    if c is None:
                        has_acc = False
                    else:
                        correct_t += c
                    seen += n
                    batches += 1
                if seen == 0:
                    raise ArgumentValueError("data: the training loader yielded no batches")
                loss_sum, reg_sum, correct = float(loss_t), float(reg_t), int(correct_t)   # the epoch's reads
                if sched is not None:
                    sched.step()
                record: dict[str, Any] = {
                    "epoch": epoch, "step": step,
                    "train_loss": loss_sum / seen, "train_reg": reg_sum / seen,
                    "train_acc": correct / seen if has_acc else None,
                    "test_loss": None, "test_acc": None, "lr": lr_now,
                }
                if tdata.test_loader is not None:
                    record["test_loss"], record["test_acc"] = _evaluate(model, tdata.test_loader, resolved_loss, device)
                record["time"] = time.perf_counter() - t0
                run_callbacks(epoch, record)
                history.append(record)
                if ckpt_path is not None:
                    atomic_save({
                        "format": FORMAT, "epoch": epoch, "step": step, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None,
                        "rng": {"torch": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                                "loader": tdata.loader_rng_state()},
                        "fingerprint": fingerprint, "history": json.loads(json.dumps(history, default=_json_default)),
                        "config": config,
                    }, ckpt_path)
                if log_path is not None:
                    _write_log(log_path, history, rewrite=False)
                bar.update(1)
                post = {"loss": f"{record['train_loss']:.4g}"}
                if record["test_acc"] is not None:
                    post["test_acc"] = f"{record['test_acc']:.4f}"
                bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in post.items()))
        finally:
            bar.close()
    return TrainResult(history=history, model=model, checkpoint_path=ckpt_path, log_path=log_path,
                       resumed_from=resumed_from)


@torch.no_grad()
def _evaluate(model: nn.Module, loader: Iterable, loss_kind: Optional[Union[str, Callable]],
              device: torch.device) -> tuple[Optional[float], Optional[float]]:
    """(mean data loss, accuracy or None) over ``loader`` in eval mode (restores train mode)."""
    loss_t, _, correct_t = _epoch_sums(device)   # on the device: one host read at the end
    seen, has_acc = 0, True
    with module_mode(model, False):  # every submodule's mode restored after
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            kind = loss_kind if loss_kind is not None else _resolve_loss(None, yb)
            out = model(xb)
            n = xb.shape[0]
            loss_t += _data_loss(kind, out, yb).double() * n
            c = _correct(out, yb)
            if c is None:
                has_acc = False
            else:
                correct_t += c
            seen += n
    if seen == 0:
        return None, None
    return float(loss_t) / seen, (int(correct_t) / seen if has_acc else None)
