"""`python -m benchmarks.run [--device cpu|cuda] [--only box_iou,nms] [--quick]`

Times every workload against its anchor in one process, on the same inputs,
prints one table (markdown), writes benchmarks/results/<device>.{json,md} and a PNG
chart of the speedups beside them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import re
import subprocess
import sys
import time

import torch

import pyvision_ops

from . import common

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_revision() -> str | None:
    """The commit measured: PYVISION_OPS_COMMIT when set (the lent GPU machine gets a copy of
    the tree, whose .git, when it comes along, can be an older checkout's), else git's, with
    "+dirty" for uncommitted changes outside benchmarks/results; None outside a checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    if os.environ.get("PYVISION_OPS_COMMIT"):
        return os.environ["PYVISION_OPS_COMMIT"]
    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        rev = None
    if not rev:
        return None
    return rev + ("+dirty" if dirty else "")


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def families() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))


def workloads(only: list[str] | None) -> list[common.Workload]:
    out = []
    for fam in families():
        if only and fam not in only:
            continue
        out += importlib.import_module(f"benchmarks.bench_{fam}").WORKLOADS
    return out


def device_name(device: str) -> str:
    if device == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return "cpu"


def run(device: str, only: list[str] | None, quick: bool, save=None) -> dict:
    """Times every selected workload. `save(result)` is called after each row, so that a run
    cut short (a timeout on a lent GPU) still leaves the rows measured so far. A workload that
    raises is recorded as a failed row and the run goes on."""
    bandwidth = common.cuda_copy_bandwidth() if device == "cuda" else None
    info = pyvision_ops.build_info()
    result = {
        "device": device_name(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["python -m benchmarks.run"] + sys.argv[1:]),
        "commit": git_revision(),
        "host": {"machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
                 "torch": torch.__version__, "torchvision": _version("torchvision"), "triton": _version("triton"),
                 "pyvision_ops": info["version"]},
        "copy_bandwidth_gbps": bandwidth / 1e9 if bandwidth else None,
        "rows": [],
    }
    for w in workloads(only):
        if device not in w.devices or (quick and not w.quick):
            continue
        try:
            row = _measure(w, device, quick, bandwidth)
        except Exception as e:  # noqa: BLE001 - one broken workload must not lose the others
            row = {"family": w.family, "workload": w.name, "anchor": w.anchor,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
        result["rows"].append(row)
        print(_fmt_row(row), flush=True)
        if save:
            save(result)
    return result


def _measure(w: common.Workload, device: str, quick: bool, bandwidth: float | None) -> dict:
    anchor_fn, ours_fn = w.make(device)
    t_anchor, t_ours = common.time_pair(anchor_fn, ours_fn, device, quick, w.graph)
    row = {"family": w.family, "workload": w.name, "anchor": w.anchor,
           "anchor_ms": t_anchor * 1e3, "ours_ms": t_ours * 1e3, "speedup": t_anchor / t_ours}
    if device == "cuda":
        row["anchor_peak_mb"] = common.peak_cuda_memory(anchor_fn) / 2**20
        row["ours_peak_mb"] = common.peak_cuda_memory(ours_fn) / 2**20
        if w.bytes_moved is not None:
            row["ours_gbps"] = w.bytes_moved() / t_ours / 1e9
            row["bandwidth_fraction"] = w.bytes_moved() / t_ours / bandwidth
    return row


def _fmt_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['workload']} | {r['anchor']} | failed: {r['error']} |"
    cells = [r["workload"], r["anchor"], f"{r['anchor_ms']:.3f}", f"{r['ours_ms']:.3f}", f"{r['speedup']:.2f}x"]
    if "anchor_peak_mb" in r:
        cells.append(f"{r['anchor_peak_mb']:.1f} / {r['ours_peak_mb']:.1f}")
    if "bandwidth_fraction" in r:
        cells.append(f"{r['ours_gbps']:.0f} GB/s ({100 * r['bandwidth_fraction']:.0f}% of copy)")
    return "| " + " | ".join(cells) + " |"


def table(result: dict) -> str:
    head = ["workload", "anchor", "anchor ms", "ours ms", "speedup"]
    if any("anchor_peak_mb" in r for r in result["rows"]):
        head.append("peak MB anchor / ours")
    if any("bandwidth_fraction" in r for r in result["rows"]):
        head.append("ours bandwidth")
    host = result.get("host", {})
    versions = ", ".join(f"{k} {host[k]}" for k in ("torch", "torchvision", "triton") if host.get(k))
    lines = [f"Device: {result['device']} ({result['date']}, `{result['command']}`, commit "
             f"{result.get('commit') or 'unknown'}; {versions}; {host.get('cpu_threads', '?')} CPU threads)"]
    if result["copy_bandwidth_gbps"]:
        lines[0] += f"; measured copy bandwidth {result['copy_bandwidth_gbps']:.0f} GB/s"
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [_fmt_row(r) for r in result["rows"]]
    return "\n".join(lines)


def chart(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Rows whose anchor is another of our own ops (Soft-NMS against our NMS, the deterministic
    # backward against our atomic one) are costs, not speedups over torch: left out.
    rows = [r for r in result["rows"] if "speedup" in r and not r["anchor"].startswith("our ")]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.2))
    ax.barh([r["workload"] for r in rows], [r["speedup"] for r in rows], color="#3a7")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("speedup over anchor (higher is better)")
    ax.set_title(f"pyvision_ops on {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", help="comma-separated families: " + ",".join(families()))
    p.add_argument("--quick", action="store_true", help="shorter timing, quick workloads only")
    p.add_argument("--out", default=RESULTS, help="folder for <device>.json / .png / .md")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    only = args.only.split(",") if args.only else None
    if only and set(only) - set(families()):
        p.error(f"--only: unknown families {sorted(set(only) - set(families()))}; known: {families()}")

    stem = os.path.join(args.out, device_name(args.device))
    os.makedirs(args.out, exist_ok=True)
    result = run(args.device, only, args.quick, save=lambda r: _save(r, stem))
    if any("speedup" in r for r in result["rows"]):
        chart(result, stem + ".png")
    print()
    print(table(result))
    print(f"\nwrote {stem}.json, .md, .png")
    if any("error" in r for r in result["rows"]):
        sys.exit(1)


def _save(result: dict, stem: str) -> None:
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table(result) + "\n")

if __name__ == "__main__":
    main()
