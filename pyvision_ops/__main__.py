"""`python -m pyvision_ops`: build information and the ops with their backends."""

from . import build_info, op_table


def main() -> None:
    print("pyvision_ops build info")
    for key, value in build_info().items():
        print(f"  {key:15s} {value}")
    rows = op_table()
    width = max(len(r["op"]) for r in rows)
    print(f"\n{'op':{width}s}  {'CPU':4s}  {'CUDA':10s}  usable on CUDA here")
    for r in rows:
        print(f"{r['op']:{width}s}  {r['cpu']:4s}  {r['cuda']:10s}  {'yes' if r['cuda_usable_here'] else 'no'}")


if __name__ == "__main__":
    main()
