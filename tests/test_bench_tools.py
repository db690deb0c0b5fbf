"""The benchmark tools' own logic, on the CPU (the workloads themselves run in `make bench`
and `pytest benchmarks --benchmark-only`)."""

import os

import torch


def test_profile_cuda_reads_the_profiler_here():
    # benchmarks.profile_cuda runs on a GPU; its event reading runs here on the CPU (no kernels).
    from benchmarks.profile_cuda import _profile

    host, gpu, rows = _profile(lambda: torch.ones(64).cumsum(0), cuda=False)
    assert host > 0 and gpu == 0 and rows == []


def test_tuner_configs_name_every_kernel_parameter():
    # the tuners assign their configs wholesale to the launchers' config dicts
    from pyvision_ops.kernels import box_iou, cross_entropy

    from benchmarks import tune_box_iou, tune_cross_entropy

    assert all(set(c) == set(box_iou.PAIRWISE_CONFIG) for c in tune_box_iou.CONFIGS)
    assert all(set(c) == set(cross_entropy.CE_CONFIG) for c in tune_cross_entropy.CONFIGS)
    assert all(set(c) == set(cross_entropy.CE_TILE_CONFIG) for c in tune_cross_entropy.TILE_CONFIGS)
    assert box_iou.PAIRWISE_CONFIG in tune_box_iou.CONFIGS and box_iou.PAIRWISE_IOU_CONFIG in tune_box_iou.CONFIGS
    assert cross_entropy.CE_CONFIG in tune_cross_entropy.CONFIGS
    assert cross_entropy.CE_TILE_CONFIG in tune_cross_entropy.TILE_CONFIGS


def test_soft_nms_scaling_prints_a_row_per_size(capsys, monkeypatch):
    from benchmarks import soft_nms_scaling
    from benchmarks.bench_nms import KERNEL_ENV

    monkeypatch.delenv(KERNEL_ENV, raising=False)
    soft_nms_scaling.main(["--device", "cpu", "--sizes", "40,1100"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert [r.split(" | ")[:2] for r in rows] == [["| 40", "1"], ["| 1100", "4"]]
    assert all(r.endswith("| yes |") for r in rows)
    assert KERNEL_ENV not in os.environ  # restored


def test_sanitize_runs_every_case(capsys, monkeypatch):
    # gpu_check.sh runs it under compute-sanitizer; here its calls run on the CPU kernels
    from benchmarks import sanitize
    from benchmarks.bench_nms import KERNEL_ENV

    monkeypatch.delenv(KERNEL_ENV, raising=False)
    from pyvision_ops.kernels import box_iou, cross_entropy

    configs = [dict(box_iou.PAIRWISE_IOU_CONFIG), dict(box_iou.PAIRWISE_CONFIG), dict(cross_entropy.CE_CONFIG),
               dict(cross_entropy.CE_TILE_CONFIG)]
    sanitize.main(["--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    extra = len(sanitize.MULTI_CASES) + len(sanitize.LEAD_CASES)
    assert len(lines) == 3 + 2 * (len(sanitize.SOFT_CASES) + 1) + extra + 3
    spread = len(sanitize.SOFT_CASES) + 1  # and batched_soft_nms
    assert sum("soft_nms spread" in r for r in lines) == spread
    assert sum("soft_nms multi" in r for r in lines) == spread + len(sanitize.MULTI_CASES)
    assert sum("soft_nms lead" in r for r in lines) == len(sanitize.LEAD_CASES)
    sanitize.main(["--device", "cpu", "--triton"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 27 and sum("fwd+bwd" in r for r in lines) == 21
    # restored
    assert not torch.are_deterministic_algorithms_enabled() and KERNEL_ENV not in os.environ
    assert configs == [box_iou.PAIRWISE_IOU_CONFIG, box_iou.PAIRWISE_CONFIG, cross_entropy.CE_CONFIG,
                       cross_entropy.CE_TILE_CONFIG]


def test_results_name_the_commit_measured(tmp_path, monkeypatch):
    from benchmarks import run

    monkeypatch.delenv("PYVISION_OPS_COMMIT", raising=False)
    rev = run.git_revision()
    assert rev is not None and rev.split("+")[0].isalnum()
    monkeypatch.setenv("PYVISION_OPS_COMMIT", "abc1234")  # named by hand: wins over a checkout's
    assert run.git_revision() == "abc1234"
    monkeypatch.setattr(run, "ROOT", str(tmp_path))  # a copied tree: no .git
    monkeypatch.delenv("PYVISION_OPS_COMMIT", raising=False)
    assert run.git_revision() is None
    monkeypatch.setenv("PYVISION_OPS_COMMIT", "abc1234")
    assert run.git_revision() == "abc1234"


def test_sass_box_iou_counts_the_pairwise_kernels_instructions():
    # compiles for sm_90 offline (no GPU); a process of its own, without the interpreter this
    # suite sets. More arithmetic per pair, more instructions an output.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.sass_box_iou"], capture_output=True, text=True, env=env,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    cells = [c for r in out.splitlines() if r.startswith("| launcher") for c in r.strip(" |").split(" | ")[2:]]
    per_output = [float(c.split(" / ")[0]) for c in cells]
    assert len(per_output) == 4 and per_output == sorted(per_output) and 10 < per_output[0] < per_output[3] < 200


def test_sass_cross_entropy_finds_the_class_loops_loads():
    # the same offline compile: the plain kernel's class loop (two planes a step) has one or
    # two 16-byte loads a thread in flight before its first exponential (the compiler decides
    # whether the second issues after the first plane's arithmetic or before it; both have
    # been seen), a tile of 4 classes four (the reason for the tiles); pipelined in 3
    # stages, the plain loop's two planes a step copy to shared memory two steps ahead (64
    # bytes)
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    only = r"^plain BLOCK 1024, 8 warps, UNROLL 2, STAGES [13]$|^tile BLOCK_C 4, BLOCK 1024, 8 warps, STAGES 1$"
    out = subprocess.run([sys.executable, "-m", "benchmarks.sass_cross_entropy", "--only", only], capture_output=True,
                         text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    assert out.startswith("sm_90 code from Triton ")
    rows = {r.split(" | ")[0].strip("| "): r.strip(" |").split(" | ")[1:] for r in out.splitlines()
            if r.startswith(("| plain", "| tile"))}
    in_flight = {label: [int(c.split(" / ")[0]) for c in cells] for label, cells in rows.items()}
    plain = in_flight.pop("plain BLOCK 1024, 8 warps, UNROLL 2, STAGES 1")
    assert in_flight == {"plain BLOCK 1024, 8 warps, UNROLL 2, STAGES 3": [64, 64, 64],
                         "tile BLOCK_C 4, BLOCK 1024, 8 warps, STAGES 1": [64, 64, 64]}
    assert all(b in (16, 32) for b in plain), plain
    assert all(5 < float(c.split(" / ")[1]) < 200 and "LOCAL:0" in c for r in rows.values() for c in r)
