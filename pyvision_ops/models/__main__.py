"""``python -m pyvision_ops.models train MODEL [options]`` / ``evaluate CHECKPOINT``.

Trains a zoo model on synthetic shapes, reports its metric on held-out images (another
seed of the same generator) and optionally saves a checkpoint that ``evaluate`` reloads.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import MODELS, SyntheticShapes, train

EVAL_SEED = 1_000_000  # held-out images: a seed no training run uses by default


def _evaluate(model, data_config: dict, images: int, device) -> str:
    model.eval()
    scores = model.evaluate(SyntheticShapes(**data_config, seed=EVAL_SEED).batch(images).to(device))
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) + f" on {images} held-out images"


def _check_device(parser, name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        parser.error(f"--device: {err}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:index], got {name}")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        parser.error(f"--device {name}: no such CUDA device on this machine")


def _load(parser, path: str) -> dict:
    """A checkpoint written by ``train --save``, or an argparse error saying why not."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # missing, unreadable, not a torch file (which raises almost anything)
        parser.error(f"checkpoint {path}: {err.__class__.__name__}: {(str(err).splitlines() or [''])[0]}")
    if not (isinstance(ckpt, dict) and {"model", "config", "data", "state_dict"} <= ckpt.keys()
            and isinstance(ckpt["model"], str) and ckpt["model"] in MODELS):
        parser.error(f"checkpoint {path} was not written by `train --save`")
    return ckpt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pyvision_ops.models", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model and report its held-out metric")
    t.add_argument("model", choices=sorted(MODELS))
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--width", type=int, default=16, help="backbone width (output channels / 4)")
    t.add_argument("--classes", type=int, default=3, help="object classes (1 to 6)")
    t.add_argument("--size", type=int, default=64, help="image side in pixels (a multiple of 4)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save", help="checkpoint path")
    e = sub.add_parser("evaluate", help="report a saved model's held-out metric")
    e.add_argument("checkpoint")
    for q in (t, e):
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument("--eval-images", type=int, default=64)
    args = p.parse_args(argv)

    if args.eval_images < 1:
        p.error(f"--eval-images must be at least 1, got {args.eval_images}")
    _check_device(p, args.device)
    if args.command == "evaluate":
        ckpt = _load(p, args.checkpoint)
        model = MODELS[ckpt["model"]](**ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        print(f"{ckpt['model']}: {_evaluate(model.to(args.device), ckpt['data'], args.eval_images, args.device)}")
        return

    for flag, ok, what in (("--steps", args.steps >= 1, "at least 1"),
                           ("--batch-size", args.batch_size >= 1, "at least 1"),
                           ("--lr", 0 < args.lr <= torch.finfo(torch.float32).max, "positive and finite in fp32"),
                           ("--width", args.width >= 1, "at least 1"),
                           ("--classes", 1 <= args.classes <= 6, "in [1, 6]"),
                           ("--size", args.size >= 16 and args.size % 4 == 0, "a multiple of 4, at least 16"),
                           ("--seed", 0 <= args.seed < 2**63, "in [0, 2^63)")):
        if not ok:
            p.error(f"{flag} must be {what}, got {getattr(args, flag[2:].replace('-', '_'))}")
    if args.save and not os.path.isdir(os.path.dirname(os.path.abspath(args.save))):
        p.error(f"--save: directory {os.path.dirname(os.path.abspath(args.save))} does not exist")
    torch.manual_seed(args.seed)
    data_config = {"num_classes": args.classes, "size": args.size}
    config = {"num_classes": args.classes, "width": args.width}
    model = MODELS[args.model](**config)
    data = SyntheticShapes(**data_config, seed=args.seed)
    train(model, data, args.steps, args.batch_size, args.lr, args.device,
          log=lambda step, loss, sec: print(f"step {step:5d}  loss {loss:.4f}  {sec:6.1f} s", flush=True))
    print(f"{args.model}: {_evaluate(model, data_config, args.eval_images, args.device)}")
    if args.save:
        torch.save({"model": args.model, "config": config, "data": data_config,
                    "state_dict": model.state_dict()}, args.save)
        print(f"saved {args.save}")


if __name__ == "__main__":
    sys.exit(main())
