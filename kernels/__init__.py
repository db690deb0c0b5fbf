"""Triton kernels and their launchers, one module per op family (imported as pyvision_ops.kernels).

Helpers shared by the launchers live here."""

import os

import torch


def require(ok: bool, op: str, what: str) -> None:
    """The C++ kernels' argument checks, in a launcher: a direct op call must not send
    mismatched shapes to a kernel (it would read past the end of a tensor)."""
    if not ok:
        raise RuntimeError(f"{op}: {what}")


def loss_grad(grad: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """An incoming loss gradient in `dtype`, and its step between elements: a 0-d gradient (a
    reduced loss) or the expanded scalar of a summed or averaged loss map is read in place
    (step 0) instead of materialised as a full map."""
    if grad.numel() and all(st == 0 for st in grad.stride()):
        return grad.as_strided((1,), (1,)).to(dtype), 0
    return grad.to(dtype).contiguous(), 1


def interpreting() -> bool:
    """Whether Triton runs its kernels in the interpreter (TRITON_INTERPRET, read as Triton
    reads it: "true" counts as well as "1"), for kernels whose GPU code calls libdevice."""
    import triton

    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # a Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' grids: triton.cdiv (and next_power_of_2) are constexpr
    function objects whose call costs ~1.7 us of host time, each time."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1), without triton's per-call cost (cdiv)."""
    return 1 << (max(n, 1) - 1).bit_length()


def column_blocks(op: str, width: int, block: int) -> int:
    """Blocks of `block` columns along grid dimension y, which CUDA caps at 65535."""
    blocks = cdiv(width, block)
    if blocks > 65535:
        raise NotImplementedError(f"{op}: a width of {width} needs {blocks} blocks of {block} columns, more than "
                                  "CUDA's 65535 along a grid dimension")
    return blocks


def grid_rows(op: str, rows: int, per: int = 1) -> int:
    """Programs of `per` rows each along grid dimension x, which CUDA caps at 2^31 - 1."""
    programs = cdiv(rows, per)
    if programs >= 2**31:
        raise NotImplementedError(f"{op}: {rows} rows ({per} a program) need more than CUDA's 2^31 - 1 programs "
                                  "along a grid dimension")
    return programs


def row_grid(op: str, rows: int, width: int, block: int) -> tuple[int, int]:
    """(rows, column blocks): a program per row and block of `block` columns. Their product
    stays below 2^31 too: Triton's launcher multiplies the grid's sides in a 32-bit int (a
    product that wraps to 0 or below launches nothing), and the kernels number a program's
    partial sums in 32 bits."""
    grid = grid_rows(op, rows), column_blocks(op, width, block)
    if grid[0] * grid[1] >= 2**31:
        raise NotImplementedError(f"{op}: {rows} rows of {grid[1]} blocks of {block} columns are more than 2^31 - 1 "
                                  "programs")
    return grid
