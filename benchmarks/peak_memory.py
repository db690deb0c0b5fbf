"""`python -m benchmarks.peak_memory`: peak extra host memory of one forward+backward, per variant.

Each variant runs in a fresh process: inputs are built, the peak RSS is read
(baseline), one forward+backward runs, and the peak RSS is read again; the
difference is the variant's extra memory. Workloads: cross-entropy on
(2, 19, 512, 1024) logits and upsample + cross-entropy from (2, 19, 64, 128)
logits to (512, 1024) labels, each against its torch anchor.
"""

import json
import subprocess
import sys

VARIANTS = {
    "ce/torch": "F.cross_entropy(x, y, ignore_index=255)",
    "ce/ours": "P.softmax_cross_entropy(x, y, ignore_index=255)",
    "upsample_ce/torch": "F.cross_entropy(F.interpolate(xs, size=(512, 1024), mode='bilinear'), y, ignore_index=255)",
    "upsample_ce/ours": "P.upsample_cross_entropy(xs, y, ignore_index=255)",
}

CHILD = """
import resource, torch, torch.nn.functional as F, pyvision_ops as P
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 19, 512, 1024, generator=g).requires_grad_() if {big} else None
xs = torch.randn(2, 19, 64, 128, generator=g).requires_grad_()
y = torch.randint(0, 19, (2, 512, 1024), generator=g)
y[torch.rand(2, 512, 1024, generator=g) < 0.1] = 255
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
({expr}).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def measure(name: str) -> int:
    code = CHILD.format(expr=VARIANTS[name], big=name.startswith("ce/"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def main():
    rows = {name: measure(name) for name in VARIANTS}
    for family in ("ce", "upsample_ce"):
        t, o = rows[f"{family}/torch"], rows[f"{family}/ours"]
        print(f"{family:12s} torch {t / 2**20:8.1f} MiB   ours {o / 2**20:8.1f} MiB   ours/torch {o / max(t, 1):.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
