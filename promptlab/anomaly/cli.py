"""``promptlab anomaly train | eval | predict``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    """``promptlab run`` of a ``task: anomaly`` recipe (``--resume``: ``resume=true``)."""
    from promptlab.anomaly.task import AnomalyDetection
    from promptlab.resources import find_recipe
    from promptlab.runner import run_recipe

    overrides = [*args.overrides, *(["resume=true"] if args.resume else [])]
    _, m = run_recipe(find_recipe(args.recipe), overrides, overwrite=args.overwrite)
    print(AnomalyDetection().summary(m))
    print(f"prompts exported to {m['prompts']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Exported prompts on a dataset, through the engine's evaluate and the anomaly evaluator."""
    import torch

    from promptlab.anomaly.data import AnomalyDataset, load_items
    from promptlab.anomaly.evaluator import AnomalyEvaluator
    from promptlab.anomaly.task import AnomalyBatches, AnomalyDetection
    from promptlab.engine import evaluate
    from promptlab.export import read_prompt_config
    from promptlab.runner import load_prompts_dir, resolve_device

    device = resolve_device(args.device)
    prompts = module_dir(args.prompts_dir)
    module = load_prompts_dir(prompts, device=device)
    size = args.image_size or read_prompt_config(prompts).get("image_size") or module.clip.image_size
    items = load_items(args.layout, args.root, args.split)
    ds = AnomalyDataset(items, size, module.clip.image_mean, module.clip.image_std)
    batches = AnomalyBatches(ds, args.batch_size, torch.Generator(), shuffle=False)
    evaluator = AnomalyEvaluator(items, sigma=args.sigma, aupro_convention=args.aupro)
    m = evaluate(module, batches, device=device, evaluator=evaluator)
    print(AnomalyDetection().summary(m))
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
        "train",
        help="train on the auxiliary dataset, export, evaluate (a `task: anomaly` recipe; as `promptlab run`)",
    )
    t.add_argument("recipe", help="e.g. anomaly/anomalyclip_mvtec")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.add_argument("--resume", action="store_true", help="continue the interrupted run in output_dir")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
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
