"""``promptlab anomaly train | eval | predict``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _print_metrics(m: dict) -> None:
    fmt = lambda v: "  -  " if v is None else f"{v:5.1f}"  # noqa: E731
    keys = ("pixel_auroc", "pixel_aupro", "image_auroc", "image_ap")
    print(f"{'category':<16}" + "".join(f"{k:>13}" for k in keys))
    for cat, row in [*m["categories"].items(), ("mean", m["mean"])]:
        print(f"{cat:<16}" + "".join(f"{fmt(row[k]):>13}" for k in keys))


def cmd_train(args: argparse.Namespace) -> int:
    from promptlab.anomaly.loop import load_anomaly_recipe, run_anomaly
    from promptlab.resources import find_recipe

    cfg = load_anomaly_recipe(find_recipe(args.recipe), args.overrides)
    m = run_anomaly(cfg, resume=args.resume)
    if "mean" in m:
        _print_metrics(m)
    print(f"prompts exported to {m['prompts']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from promptlab.anomaly.data import AnomalyDataset, load_items
    from promptlab.anomaly.loop import _device, evaluate_anomaly, load_anomaly_prompts

    device = _device(args.device)
    module = load_anomaly_prompts(args.prompts_dir, device=device)
    meta = json.loads((Path(module_dir(args.prompts_dir)) / "prompt_config.json").read_text())
    size = args.image_size or meta.get("image_size") or module.clip.image_size
    items = load_items(args.layout, args.root, args.split)
    ds = AnomalyDataset(items, size, module.clip.image_mean, module.clip.image_std)
    m = evaluate_anomaly(
        module, ds, device=device, batch_size=args.batch_size, sigma=args.sigma, aupro_convention=args.aupro
    )
    _print_metrics(m)
    if args.out:
        from promptlab import io

        io.atomic_write_json(args.out, m)
    return 0


def module_dir(path: str) -> Path:
    p = Path(path)
    return p / "prompts" if not (p / "prompt_config.json").exists() and (p / "prompts").is_dir() else p


def cmd_predict(args: argparse.Namespace) -> int:
    from promptlab.anomaly.predict import predict

    out = Path(args.out) if args.out else module_dir(args.prompts_dir).parent / "predictions"
    rows = predict(
        module_dir(args.prompts_dir),
        args.images,
        out,
        image_size=args.image_size,
        sigma=args.sigma,
        device=args.device,
    )
    skipped = [r for r in rows if r["error"]]
    for r in rows:
        if not r["error"]:
            print(f"{r['score']:.4f}  {r['image']}  -> {r['overlay']}")
    for r in skipped:
        print(f"skipped: {r['error']}", file=sys.stderr)
    print(f"scores: {out / 'scores.csv'} ({len(rows) - len(skipped)} scored, {len(skipped)} skipped)")
    return 1 if skipped else 0  # 1: partial, some inputs unreadable (listed, and in scores.csv)


def add_anomaly_commands(sub: argparse._SubParsersAction) -> None:
    """Register the ``anomaly`` command group on the top-level parser."""
    a = sub.add_parser("anomaly", help="zero-shot anomaly detection (AnomalyCLIP): train | eval | predict")
    asub = a.add_subparsers(dest="anomaly_command", required=True)

    t = asub.add_parser(
        "train", help="train on the auxiliary dataset, export, evaluate (a `kind: anomaly` recipe)"
    )
    t.add_argument("recipe", help="e.g. anomaly/anomalyclip_mvtec")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.add_argument("--resume", action="store_true")
    t.set_defaults(func=cmd_train)

    e = asub.add_parser("eval", help="evaluate exported prompts on a dataset (per category and mean)")
    e.add_argument("prompts_dir")
    e.add_argument("--layout", required=True, choices=["mvtec", "visa", "folder"])
    e.add_argument("--root", required=True)
    e.add_argument("--split", default="test")
    e.add_argument("--image-size", type=int)
    e.add_argument("--sigma", type=float, default=4.0)
    e.add_argument("--aupro", default="published", choices=["published", "fpr_limit"])
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", help="write the metrics as JSON here")
    e.set_defaults(func=cmd_eval)

    p = asub.add_parser(
        "predict",
        help="heat-map overlays (PNG) and scores.csv for images; unreadable ones are skipped (exit 1)",
    )
    p.add_argument("prompts_dir")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", help="output folder (default: predictions/ beside the prompts)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--sigma", type=float)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_predict)
