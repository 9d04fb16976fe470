"""What every benchmark report states: the machine, the versions, the command; and writing the report.

A report (or one block of a shared report, such as docs/BENCHMARKS.md) is written by the script that measured
it, with the command that made it and the machine it ran on, so every figure can be traced and regenerated.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
CONF_DIR = REPO / "conf"
RECORDS = Path(__file__).resolve().parent / "records"
# The blocks of docs/BENCHMARKS.md, in the order they appear: each written by its benchmark, the last by hand.
BENCHMARKS_MD = DOCS / "BENCHMARKS.md"
BLOCKS = ("speed", "speed-avx2", "presets", "gpu", "startup", "augment", "denormal", "retired")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def default_data_root() -> str:
    """The MNIST copy beside the checkout where there is one (the project's machines), else ./data."""
    shared = REPO.parent / "shared" / "datasets" / "mnist"
    return str(shared if shared.exists() else REPO / "data")


# --------------------------------------------------------------------------------------------------------------
# The machine and the versions
# --------------------------------------------------------------------------------------------------------------


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu() -> dict:
    """The CPU: model name, the instruction-set flags that decide matmul speed, whether bf16 runs natively,
    the kernels torch picked (``torch.backends.cpu.get_cpu_capability()``) and the cores this process may use."""
    import torch

    from mnist_sweep import training

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 0
    return {
        "model": info.get("model name") or platform.processor() or "unknown CPU",
        "flags": [f for f in FLAGS if f in flags],
        "bf16_native": training.native_bf16(torch.device("cpu"), flags),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        "cores": cores,
    }


def gpu() -> str | None:
    """The first CUDA device's name, or None."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine() -> str:
    """One line: CPU model, flags, bf16, torch's kernels, cores, OS, and the GPU if any."""
    c = cpu()
    flags = ", ".join(c["flags"]) or "none of " + "/".join(FLAGS)
    bf16 = "bf16 native" if c["bf16_native"] else "bf16 emulated (no AVX-512 BF16 or AMX in use)"
    held = f"; held to {c['onednn_isa']} by ONEDNN_MAX_CPU_ISA" if c["onednn_isa"] else ""
    return (
        f"{c['model']} ({flags}{held}; {bf16}; torch CPU kernels {c['capability']}), {c['cores']} cores, "
        f"{platform.system()} {platform.release()}; GPU: {gpu() or 'none'}"
    )


def versions() -> dict[str, str]:
    """The versions that shape the figures, read from the installed packages' metadata (nothing imported, so a
    machine without MLflow, a GPU box say, reports what it has)."""
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("hydra-core", "mlflow", "torchvision", "optuna", "joblib"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def versions_line() -> str:
    import torch

    v = versions()
    return ", ".join(f"{k} {val}" for k, val in v.items()) + f" ({torch.get_num_threads()} torch threads)"


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The command a report was made with: ``python -m MODULE`` and its arguments, quoted for a shell."""
    words = sys.argv[1:] if argv is None else argv
    return " ".join([f"python -m {module}", *(shlex.quote(w) for w in words)])


def header(command: str) -> list[str]:
    """The lines every report starts with: the command and the machine it ran on."""
    return [f"Command: `{command}`", "", f"Machine: {machine()}.", "", f"Versions: {versions_line()}.", ""]


# --------------------------------------------------------------------------------------------------------------
# Writing reports
# --------------------------------------------------------------------------------------------------------------


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- begin {name} -->", f"<!-- end {name} -->"


def replace_block(document: str, name: str, text: str, order: tuple[str, ...] = BLOCKS) -> str:
    """``document`` with its block ``name`` replaced by ``text`` (the rest kept as it is). A block not there yet
    goes before the first block that ``order`` puts after it, else at the end."""
    begin, end = _markers(name)
    block = f"{begin}\n{text.strip()}\n{end}"
    start, stop = document.find(begin), document.find(end)
    if (start < 0) != (stop < 0) or stop < start or document.count(begin) > 1:
        raise ValueError(f"the markers of block {name!r} are broken: want one '{begin}' then one '{end}'")
    if start >= 0:
        return document[:start] + block + document[stop + len(end) :]
    later = order[order.index(name) + 1 :] if name in order else ()
    for other in later:
        at = document.find(_markers(other)[0])
        if at >= 0:
            return document[:at] + block + "\n\n" + document[at:]
    return (document.rstrip() + "\n\n" if document.strip() else "") + block + "\n"


def write_report(out: str | Path, text: str, block: str | None = None) -> None:
    """Write a markdown report, whole or as one block of a shared file (its other blocks kept), and print it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if block is not None:
        text_out = replace_block(out.read_text() if out.is_file() else "", block, text)
    else:
        text_out = text
    out.write_text(text_out)
    print(text)
    print(f"wrote {out}" + (f" (block {block})" if block else ""))


def compose(overrides: list[str]):
    """The config ``python train.py OVERRIDES`` would run, and its checked settings (same schema and presets)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mnist_sweep import config

    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return cfg, config.check(cfg)


def block_main(name: str, doc: str, add_arguments, measure, argv: list[str] | None = None) -> int:
    """The command line of a benchmark that writes its block ``name`` of docs/BENCHMARKS.md: ``--data-root``, its
    own options (``add_arguments(parser)``), ``--out`` and ``--silent``; ``measure(args)`` returns the block."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc.split("\n\n")[0])
    parser.add_argument("--data-root", default=default_data_root())
    add_arguments(parser)
    parser.add_argument("--out", default=str(BENCHMARKS_MD), help=f"its '{name}' block is written")
    parser.add_argument("--silent", action="store_true")
    args = parser.parse_args(argv)
    args.argv = argv
    write_report(args.out, measure(args), block=name)
    return 0
