"""The lessons: pick a device, build the optimiser and schedule, then train and evaluate.

Everything here takes plain Python values and torch objects, never the Hydra config, so each step can be
used and tested on its own. ``fit`` is the whole training loop, top to bottom.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mnist_sweep import UserError

log = logging.getLogger(__name__)


class DeviceError(UserError):
    """The requested device does not exist on this machine."""


class DivergedError(UserError):
    """The loss became NaN or infinite: training cannot recover, so the run stops at once."""

    exit_code = 1  # the config was valid; the run failed


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is missing is a clear error."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("device=cuda but this machine has no usable CUDA GPU; use device=cpu or device=auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name} does not exist ({torch.cuda.device_count()} GPU(s)); use device.type=cuda:0"
            )
    if name == "mps" and not has_mps:
        raise DeviceError("device=mps but Apple's Metal backend is not available; use device=cpu or device=auto")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """What the run ran on, in words: the GPU's name, or the CPU's model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_model()}, {torch.get_num_threads()} threads"
    return device.type


def cpu_model() -> str:
    """The processor's model name (Linux's /proc/cpuinfo, else what the platform module knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class TooLargeError(UserError):
    """A config that cannot fit in the device's memory, refused before anything is built."""


# Optimizer state per weight, in copies of the weights: Adam keeps two running averages, SGD one momentum.
OPTIMIZER_COPIES = {"adam": 2, "adamw": 2, "sgd": 1}


def memory_estimate(
    *,
    hidden: int,
    depth: int,
    members: int,
    num_classes: int,
    batch_size: int,
    eval_batch_size: int,
    optimizer: str,
    dataset_on_device: bool,
    n_images: int = 70000,
    pixels: int = 28 * 28,
) -> dict[str, int]:
    """Bytes a run needs at its peak, by part, from its settings alone (fp32; nothing is built).

    weights, their gradients and the optimizer's state; the activations kept for backward of one training batch
    (each hidden layer keeps its linear output, its activation and a dropout or norm copy: 4 values per unit, an
    upper bound) and of one evaluation batch; the whole dataset as float32 where the tensor loader holds it
    (plus its uint8 copy)."""
    widths = [pixels] + [hidden] * depth + [num_classes]
    linear = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))  # each Linear: weights, biases
    weights = members * (linear + 2 * hidden * depth)  # + a norm's scale and shift per hidden unit (upper bound)
    parts = {
        "weights": 4 * weights,
        "gradients": 4 * weights,
        "optimizer state": 4 * weights * OPTIMIZER_COPIES.get(optimizer, 2),
        "activations": 4 * members * (batch_size * (pixels + 4 * hidden * depth + 3 * num_classes)),
        "evaluation": 4 * members * eval_batch_size * (pixels + 2 * hidden + num_classes),
        "dataset": (4 + 1) * n_images * pixels if dataset_on_device else 0,
    }
    return parts


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still give: free GPU memory, or the host's MemAvailable (Linux); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


def check_fits(parts: dict[str, int], device: torch.device, available: int | None = None) -> None:
    """Refuse, in one line with the estimate, a config whose peak memory exceeds what the device has."""
    available = available_memory(device) if available is None else available
    need = sum(parts.values())
    if available is None or need <= 0.9 * available:
        return
    gb = 1024**3
    biggest = ", ".join(f"{k} {v / gb:.1f} GB" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:3])
    raise TooLargeError(
        f"this config needs about {need / gb:.1f} GB ({biggest}) and {device} has {available / gb:.1f} GB "
        "available; lower model.hidden, model.depth, model.members or data.batch_size"
    )


def build_optimizer(make: Callable, params) -> torch.optim.Optimizer:
    """``make(params)`` (a ``torch.optim`` class or a partial of one, as ``instantiate`` returns it), built from
    a subclass without torch.compile's guards. torch.optim wraps ``__init__``'s ``add_param_group``, ``step``,
    ``zero_grad`` and the state-dict methods in calls that import ``torch._dynamo`` (about 1 s of start-up,
    ``python -X importtime -c 'import torch._dynamo'``) only to tell the compiler where to break its graph;
    this project never compiles, so those wrappers are peeled off (only torch's own two, recognised by their
    code) and ``step`` runs under ``no_grad`` as theirs does. The arithmetic is torch's own: same numbers,
    same state dicts."""
    base = getattr(make, "func", make)
    if not (isinstance(base, type) and issubclass(base, torch.optim.Optimizer)):
        return make(params)
    peeled = {name: _peel(getattr(base, name)) for name in _GUARDED}
    step = peeled.pop("step")

    def eager_step(self, *args, **kwargs):
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            return step(self, *args, **kwargs)

    eager = type(base.__name__, (base,), {**peeled, "step": eager_step, "__module__": base.__module__})
    args, kwargs = getattr(make, "args", ()), getattr(make, "keywords", {})
    return eager(params, *args, **kwargs)


_GUARDED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict", "step")
# The files of torch's compiler-guard wrappers (_use_grad_for_differentiable, _disable_dynamo)
_GUARD_FILES = {sys.modules[f.__module__].__file__ for f in (torch.optim.Optimizer, torch._disable_dynamo)}


def _peel(fn: Callable) -> Callable:
    """``fn`` without torch's compiler-guard wrappers, recognised by the file their code is in."""
    while getattr(fn, "__wrapped__", None) is not None and fn.__code__.co_filename in _GUARD_FILES:
        fn = fn.__wrapped__
    return fn


def lr_multiplier(step: int, total: int, warmup: float, start: float, decay: str, final: float) -> float:
    """The learning rate at ``step`` of ``total``, as a fraction of the optimiser's base lr.

    Linear warm-up from ``start`` to 1 over the first ``warmup`` fraction of the steps, then hold (``none``)
    or decay to ``final`` (``cosine`` or ``linear``) over the rest.
    """
    n_warm = int(round(warmup * total))
    if step < n_warm:
        return start + (1 - start) * step / n_warm
    if decay == "none":
        return 1.0
    progress = (step - n_warm) / max(1, total - n_warm - 1)
    progress = min(1.0, progress)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return final + (1 - final) * shape


def cpu_flags() -> set[str]:
    """The processor's feature flags (Linux's /proc/cpuinfo; empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# A CPU runs bf16 matmuls natively with AVX512_BF16 or AMX; without them torch emulates bf16 in fp32 and
# converts on every operation, many times slower than fp32 (an AVX2-only EPYC: ../shared/NOTES.md).
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


# oneDNN, which runs torch's bf16 matmuls on a CPU, can be held below the CPU's level (ONEDNN_MAX_CPU_ISA): at
# these levels it emulates bf16 (measured on a Xeon with AMX: AVX2 250x, AVX512_CORE 5x slower than fp32).
ONEDNN_BELOW_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def native_bf16(device: torch.device, flags: set[str] | None = None, env: dict[str, str] | None = None) -> bool:
    """Whether ``device`` computes in bf16 at full speed: CUDA GPUs that support it; CPUs with the flags above,
    unless oneDNN is told to stay below them."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        env = os.environ if env is None else env
        isa = (env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or "").upper()
        return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags)) and isa not in ONEDNN_BELOW_BF16
    return False  # mps and the rest: fp32 is the safe choice


def resolve_precision(requested: str, device: torch.device, flags: set[str] | None = None) -> str:
    """``auto`` -> bf16 where the device runs it natively, else fp32. An explicit bf16 is kept, with a warning
    where it is emulated (it still computes the same thing, only slowly)."""
    native = native_bf16(device, flags)
    if requested == "auto":
        return "bf16" if native else "fp32"
    if requested == "bf16" and not native:
        where = cpu_model() if device.type == "cpu" else device.type
        log.warning(
            "trainer.precision=bf16 on %s, which has no native bf16 (AVX512_BF16 or AMX): torch emulates it, "
            "many times slower than fp32; trainer.precision=auto picks fp32 here",
            where,
        )
    return requested


def autocast(device: torch.device, precision: str):
    """bf16 autocast (matmuls in bfloat16, reductions in fp32) or nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Evaluation:
    loss: float
    acc: float
    confusion: torch.Tensor  # [true class, predicted class] counts
    seconds: float = 0.0  # how long the evaluation took, where the caller timed it

    @property
    def per_class_acc(self) -> list[float]:
        totals = self.confusion.sum(1).clamp(min=1)
        return (self.confusion.diag() / totals).tolist()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    num_classes: int = 10,
    precision: str = "fp32",
) -> Evaluation:
    """Loss, accuracy and confusion matrix over a whole split. Sums stay on the device until the end."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    n = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
        n += len(y)
    confusion = confusion.view(num_classes, num_classes).cpu()
    return Evaluation(
        loss=loss_sum.item() / max(n, 1), acc=confusion.diag().sum().item() / max(n, 1), confusion=confusion
    )


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float
    samples_per_s: float

    @property
    def validated(self) -> bool:
        """False without a validation split (data.val_size=0), where fit sets the val numbers to NaN."""
        return not math.isnan(self.val_acc)

    def metrics(self) -> dict[str, float]:
        # Without a validation split the val metrics are left out, not logged as NaN.
        val = {"val/loss": self.val_loss, "val/acc": self.val_acc} if self.validated else {}
        return {
            "train/loss": self.train_loss,
            "train/acc": self.train_acc,
            **val,
            "lr": self.lr,
            "epoch_time_s": self.seconds,
            "train/samples_per_s": self.samples_per_s,
        }

    def summary(self, epochs: int) -> str:
        """The line each epoch prints."""
        val = f"val loss {self.val_loss:.4f} acc {self.val_acc:.4f}" if self.validated else "no val"
        return (
            f"epoch {self.epoch}/{epochs}  train loss {self.train_loss:.4f} acc {self.train_acc:.4f} | {val} | "
            f"lr {self.lr:.2g} | {self.seconds:.1f} s, {self.samples_per_s:.0f} samples/s"
        )


@dataclass
class FitResult:
    epochs: list[EpochResult] = field(default_factory=list)
    best_epoch: int = 0
    train_seconds: float = 0.0  # time in the training loop: epochs and their validation, not on_epoch's logging

    @property
    def val_acc(self) -> float:
        return self.epochs[self.best_epoch - 1].val_acc


class Progress:
    """A one-line progress bar on stderr, only when a person is watching (stderr is a terminal)."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled = enabled and sys.stderr.isatty()
        self.total, self.label, self.last = total, label, 0.0

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.1 and done < self.total):
            return
        self.last = now
        filled = int(30 * done / self.total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * (len(self.label) + 50) + "\r")
            sys.stderr.flush()


def snapshot(epoch: int, model, optimizer, scheduler, result: FitResult, stale: int, best_state) -> dict:
    """Everything ``fit`` needs to go on after ``epoch`` as if it had never stopped."""
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "history": [dataclasses.asdict(e) for e in result.epochs],
        "best_epoch": result.best_epoch,
        "stale": stale,
        "best_state": best_state,
    }


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    device: torch.device,
    schedule: Callable[[int, int], float] = lambda step, total: 1.0,
    precision: str = "fp32",
    patience: int = 0,
    grad_clip: float = 0.0,
    label_smoothing: float = 0.0,
    max_loss: float = 100.0,
    num_classes: int = 10,
    on_epoch: Callable[[EpochResult], bool | None] | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    check_every: int | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
) -> FitResult:
    """Train for ``epochs`` (or until val/acc stops improving for ``patience`` epochs) and return the history.

    With early stopping, the weights of the best epoch are restored at the end. A training loss that is NaN,
    infinite or above ``max_loss`` (random guessing scores ln(10) = 2.3) stops the run with DivergedError.

    ``on_epoch`` sees each epoch's result; returning True stops training there (a search's pruner does).
    ``augment`` distorts each training batch on the device (mnist_sweep/augment.py); evaluation never does.

    ``check_every``: how many steps between two looks at the loss from the host (default: every step on the
    CPU, every 50 elsewhere). Between looks, the worst loss is kept on the device, so no step goes unchecked.

    ``checkpoint`` gets, at each epoch's end, everything needed to go on from there (``snapshot``); ``resume``
    takes such a snapshot and continues after its epoch, so an interrupted run ends exactly as an uninterrupted
    one would (same weights, optimizer and schedule state, random streams and history).
    """
    limit = max_loss if max_loss > 0 else math.inf
    total_steps = epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, total_steps))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    # On a GPU, reading a value back (`if loss > x`, .item()) waits for the GPU to finish all queued work, so
    # the host looks at the loss only every few steps there and the loop otherwise never waits on the device;
    # on the CPU looking is free and stops a diverging run at the very step it happens.
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 50
    result, best_state, stale, first = FitResult(), None, 0, 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"])
        if resume["cuda_rng"]:
            torch.cuda.set_rng_state_all(resume["cuda_rng"])
        result.epochs = [EpochResult(**e) for e in resume["history"]]
        result.best_epoch, stale, best_state = resume["best_epoch"], resume["stale"], resume["best_state"]
        first = resume["epoch"] + 1

    for epoch in range(first, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        # Running sums stay on the device: the host reads them once, at the end of the epoch.
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        worst = torch.zeros((), device=device)  # the highest loss since the host last looked (NaN sticks)
        seen, n_steps = 0, len(train_loader)
        bar = Progress(progress, n_steps, f"epoch {epoch}/{epochs}")
        for step, (x, y) in enumerate(train_loader, 1):
            # The tensor loader's batches are already on the device (a no-op); the torchvision loader's are not.
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if augment is not None:
                x = augment(x)  # a fresh distortion of every training batch, drawn on the device
            with autocast(device, precision):  # bf16: matmuls in bfloat16, weights and loss stay fp32
                logits = model(x)
                members = len(logits) if logits.dim() == 3 else 1  # an ensemble gives [members, N, classes]
                if members > 1:  # the members' mean loss; each member learns from its own
                    loss = loss_fn(logits.float().flatten(0, 1), y.repeat(members))
                    logits = logits.float().softmax(-1).mean(0)  # their vote, for the training accuracy
                else:
                    loss = loss_fn(logits.float(), y)
            worst = torch.maximum(worst, loss.detach())
            if step % check_every == 0 or step == n_steps:  # the host looks (on a GPU: waits for it)
                if not worst <= limit:  # `not <=` catches NaN too
                    raise DivergedError(
                        f"training diverged: loss {worst.item():.4g} at epoch {epoch}, step {step} "
                        f"(lr {optimizer.param_groups[0]['lr']:.3g}); lower optimizer.lr or set trainer.grad_clip"
                    )
                worst = torch.zeros((), device=device)
            optimizer.zero_grad(set_to_none=True)
            (loss * members).backward()  # each member's gradient as if it trained alone
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            bar.update(step)
        bar.close()
        train_loss = loss_sum.item() / seen  # never above the limit: every step's loss was checked above
        train_time = time.perf_counter() - t0

        val = evaluate(model, val_loader, device, num_classes, precision) if len(val_loader) else None
        er = EpochResult(
            epoch=epoch,
            train_loss=train_loss,
            train_acc=correct.item() / seen,
            val_loss=val.loss if val else float("nan"),
            val_acc=val.acc if val else float("nan"),
            lr=lr,
            seconds=time.perf_counter() - t0,
            samples_per_s=seen / train_time,
        )
        result.epochs.append(er)
        # Early stopping on the validation set (the mock exam), never on the test set.
        if result.best_epoch == 0 or not (er.val_acc <= result.val_acc):
            result.best_epoch, stale = epoch, 0
            if patience:
                best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        # Saved before on_epoch reports the epoch: a run killed in between has it in the checkpoint.
        if checkpoint is not None:
            checkpoint(snapshot(epoch, model, optimizer, scheduler, result, stale, best_state))
        stop = bool(on_epoch(er)) if on_epoch else False
        if patience and stale >= patience:
            log.info("early stop: val/acc has not improved for %d epochs", patience)
            break
        if stop:
            break

    if patience and best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_epoch = len(result.epochs)  # without early stopping, the model is the last epoch's
    # Training time is the epochs' own time: what on_epoch does with their results (MLflow writes, a pruner's
    # report) is not training, and would otherwise count against short runs (~15 ms per epoch).
    result.train_seconds = sum(e.seconds for e in result.epochs)
    return result
