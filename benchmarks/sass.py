"""sm_90 machine code of a Triton kernel without a GPU (nor TRITON_INTERPRET): Triton
compiles it as a launch would specialise it, and its bundled cuobjdump lists the SASS and
the resources (registers; LOCAL: spills). Used by benchmarks/sass_*.py.

The code depends on the Triton release: 3.8 (this project's venv) and 3.6 (the H200 runs'
torch 2.11) schedule the cross-entropy class loop differently. To read another release's
code, put it first on the path: `pip install --no-deps --target DIR triton==3.6.0`, then
`PYTHONPATH=DIR python -m benchmarks.sass_cross_entropy`."""

import os
import re
import subprocess
import tempfile


def compiler() -> str:
    """The heading line of a table of these figures: they hold for this Triton release."""
    import triton

    return f"sm_90 code from Triton {triton.__version__}"


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, divisible=()) -> tuple[str, str]:
    """(SASS listing, "REG:n ... LOCAL:n[ SMEM:bytes]") of @triton.jit `fn` for sm_90. `signature`: Triton
    types of the runtime arguments by name; `divisible`: indices of the arguments a launch
    finds 16-divisible (16-byte aligned tensors, sizes that are multiples of 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass, res = (subprocess.run([cuobjdump, flag, f.name], capture_output=True, text=True, check=True).stdout
                     for flag in ("-sass", "-res-usage"))
    res = re.search(r"REG:\d+.*?LOCAL:\d+", res).group(0).replace("STACK:0 SHARED:0 ", "")
    # Triton's shared memory is dynamic: cuobjdump's SHARED is the static part only
    return sass, res + (f" SMEM:{kernel.metadata.shared}" if kernel.metadata.shared else "")


_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text) of each instruction of a cuobjdump -sass listing."""
    return [(int(m.group(1), 16), m.group(2)) for m in map(_LINE.match, sass.splitlines()) if m]


def count_instructions(sass: str) -> int:
    return len(instructions(sass))


def loops(sass: str) -> list[list[str]]:
    """The bodies of the listing's loops (a branch back to a lower address closes one), in
    the order they close."""
    ins = instructions(sass)
    out = []
    for addr, text in ins:
        m = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            out.append([t for a, t in ins if int(m.group(1), 16) <= a <= addr])
    return out
