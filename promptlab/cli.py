"""``promptlab run | eval | sweep | report | ls | cp | export | interpret | import | data``.

Recipes are named by path or relative to the repository's ``recipes/`` folder
(``fewshot/coop_vit_b16``); ``key=value`` arguments override recipe keys.

Errors end the command with one line naming the file or key and an exit code saying which kind of
problem it is (``--debug`` shows the traceback instead):

- 0: done;
- 1: the command ran but did not succeed (some jobs of a sweep failed), or an unexpected internal
  error;
- 2: the command, a recipe, a dataset YAML, an export or the run directory is not valid for what
  was asked (unknown key, value out of range, recipe or named file not found, untrusted component,
  a run directory in use or holding another run);
- 3: a file that is there cannot be read or written (unreadable image, permissions, an output
  path that is a file, disk full);
- 4: training stopped on a non-finite loss (the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from promptlab.resources import find_recipe, list_recipes

EXIT_FAILED, EXIT_INVALID, EXIT_IO, EXIT_DIVERGED = 1, 2, 3, 4  # see the module docstring
DEFAULT_RECIPE = "demo/coop_tiny"
# `promptlab import --from` choices: the keys of promptlab.importers.SOURCES (a test keeps them equal),
# named here so that building the parser does not import torch.
IMPORT_SOURCES = ("coop", "cocoop", "kgcoop", "maple", "ivlp", "promptsrc")

log = logging.getLogger("promptlab")


def recipe_kind(path: Path) -> str:
    """A recipe's ``kind``: ``prompt`` (every prompt-learning recipe, whatever its ``task``, the default)
    or ``pretrain`` (the sandbox CLIP's contrastive pretraining, ``promptlab.sandbox.pretrain``)."""
    from omegaconf import DictConfig, OmegaConf

    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # a malformed file: load_recipe reports it with its location
        log.debug("could not peek at %s: %s", path, e)
        return "prompt"
    kind = str(raw.get("kind", "prompt")) if isinstance(raw, DictConfig) else "prompt"
    if kind == "anomaly":
        raise ValueError(
            f"{path}: `kind: anomaly` recipes are now `task: anomaly` recipes of the one schema "
            "(see recipes/sandbox/anomalyclip.yaml: an `anomaly` section, `method._component_`, `optimizer`)"
        )
    return kind


def _split_recipe_args(args: Sequence[str]) -> tuple[str, list[str]]:
    """``[RECIPE] [k=v ...]``: without a recipe the embedded demo runs."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return DEFAULT_RECIPE, list(args)


def cmd_run(args: argparse.Namespace) -> int:
    from promptlab.runner import run_recipe
    from promptlab.tasks import task_for

    name, overrides = _split_recipe_args(args.args)
    path = find_recipe(name)
    if recipe_kind(path) == "pretrain":  # contrastive pretraining of the sandbox CLIP, not a prompt run
        from promptlab.sandbox.pretrain import main as pretrain_main

        pretrain_main([str(path), *overrides])
        return 0
    if args.profile:
        overrides.append(f"train.profile_steps={args.profile}")
    cfg, metrics = run_recipe(path, overrides, overwrite=args.overwrite)
    print(f"{task_for(cfg).summary(metrics)} -> {cfg.output_dir}")
    print(f"prompts exported to {metrics['prompts']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from promptlab.runner import eval_prompts

    metrics = eval_prompts(Path(args.path), args.overrides)
    print(
        json.dumps(
            {
                k: metrics[k]
                for k in ("dataset", "subsample", "split", "accuracy", "mean_per_class_accuracy", "n")
            },
            indent=2,
        )
    )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    for r in list_recipes():
        print(r)
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    src = find_recipe(args.recipe)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        raise FileExistsError(f"{dest} exists; pass --force to overwrite")
    shutil.copyfile(src, dest)
    print(dest)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from promptlab.runner import export_run

    print(export_run(Path(args.run_dir), Path(args.out) if args.out else None))
    return 0


def cmd_interpret(args: argparse.Namespace) -> int:
    from promptlab.export import format_interpretation, interpret
    from promptlab.runner import load_prompts_dir

    module = load_prompts_dir(Path(args.prompts_dir), args.pretrained)
    print(format_interpretation(interpret(module, module.clip, topk=args.topk)))
    return 0


def _import_classnames(args: argparse.Namespace) -> tuple[list[str], str | None, str | None]:
    """Class names (and the dataset's name and template) from ``--dataset/--root`` or ``--classnames``."""
    if args.classnames:
        p = Path(args.classnames)
        names = p.read_text(encoding="utf-8").splitlines() if p.is_file() else args.classnames.split(",")
        names = [n.strip() for n in names if n.strip()]
        if not names:
            raise ValueError(f"--classnames {args.classnames!r}: no class names in it")
        return names, None, None
    if not (args.dataset and args.root):
        raise ValueError(
            "give the classes to serve: --dataset NAME --root $DATA, or --classnames a,b,c (or a file)"
        )
    from promptlab.data import load_dataset

    ds = load_dataset(args.dataset, args.root)
    return list(ds.classnames), ds.name, ds.template


def cmd_import(args: argparse.Namespace) -> int:
    from promptlab.backbones import load_clip
    from promptlab.export import save_prompts
    from promptlab.importers import SOURCES, find_checkpoint, import_checkpoint

    classnames, dataset, template = _import_classnames(args)
    if args.epoch is not None and args.epoch != "best" and not args.epoch.isdigit():
        raise ValueError(f"--epoch {args.epoch!r}: expected an epoch number or 'best'")
    epoch = None if args.epoch is None else ("best" if args.epoch == "best" else int(args.epoch))
    file = find_checkpoint(args.checkpoint, SOURCES[args.source].model_name, epoch)
    clip = load_clip(args.arch, None if args.pretrained.lower() in ("", "none") else args.pretrained)
    hparams = {"class_token_position": args.class_token_position, "ctx_init": args.ctx_init}
    if args.source == "kgcoop":
        hparams["template"] = args.template or template or "a photo of a {}."
    known = {
        "coop": {"class_token_position"},
        "maple": {"ctx_init"},
        "ivlp": {"ctx_init"},
        "promptsrc": {"ctx_init"},
        "kgcoop": {"template"},
    }
    hparams = {k: v for k, v in hparams.items() if k in known.get(args.source, set())}
    module = import_checkpoint(file, clip, classnames, source=args.source, **hparams)
    extra = {"imported_from": str(file), "imported_source": args.source}
    if dataset:
        extra["dataset"] = dataset
    print(save_prompts(module, args.out, extra=extra))
    return 0


def _add_import_command(sub: argparse._SubParsersAction, name: str, source: str | None) -> None:
    if source is None:
        m = sub.add_parser(
            name,
            help="convert a checkpoint of a Dassl-based reference (CoOp, CoCoOp, KgCoOp, MaPLe, IVLP) into a "
            "prompts directory",
        )
        m.add_argument(
            "--from", dest="source", required=True, choices=IMPORT_SOURCES, help="the reference that wrote it"
        )
    else:
        m = sub.add_parser(name, help=f"alias of `import --from {source}`")
        m.set_defaults(source=source)
    m.add_argument(
        "checkpoint", help="a run directory, its <model>/ directory, or model.pth.tar-N / model-best.pth.tar"
    )
    m.add_argument("--dataset", help="dataset name, for its class names (with --root)")
    m.add_argument("--root", help="data root ($DATA)")
    m.add_argument(
        "--classnames", help="the class names instead of a dataset: a,b,c or a file with one per line"
    )
    m.add_argument("--arch", default="ViT-B-16")
    m.add_argument(
        "--pretrained", default="openai", help="backbone weights ('none' for an architecture without)"
    )
    m.add_argument(
        "--epoch", help="which checkpoint of a run directory: N or 'best' (default: the last saved)"
    )
    m.add_argument("--class-token-position", default="end", choices=["end", "middle", "front"], help="CoOp's")
    m.add_argument(
        "--ctx-init", help="MaPLe / IVLP: the words around the learned tokens (default 'a photo of a')"
    )
    m.add_argument("--template", help="KgCoOp: the hand-crafted prompt of its loss (default: the dataset's)")
    m.add_argument("--out", required=True)
    m.set_defaults(func=cmd_import)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptlab", description="Prompt learning on frozen CLIP models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    p.add_argument(
        "--trust-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="let recipes and dataset YAMLs name components from MODULE (your own code; repeatable; "
        "also $PROMPTLAB_TRUSTED_MODULES). Without it only promptlab's and torch.optim's are built",
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser(
        "run", help="train and evaluate a recipe ([RECIPE] [key=value ...]; default: the demo)"
    )
    r.add_argument("args", nargs="*", metavar="RECIPE|key=value")
    r.add_argument(
        "--profile",
        type=int,
        nargs="?",
        const=5,
        default=0,
        metavar="STEPS",
        help="profile STEPS training steps (default 5) and print where a step's time goes",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run already in output_dir (without it a finished or interrupted run there is kept; "
        "resume=true continues it with the same configuration)",
    )
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("eval", help="evaluate a run directory or an exported prompts directory")
    e.add_argument("path", help="RUN_DIR (has config.yaml) or PROMPTS_DIR (has prompt_config.json)")
    e.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. data.name=dtd subsample=new data.root=$DATA"
    )
    e.set_defaults(func=cmd_eval)

    sub.add_parser("ls", help="list the recipes").set_defaults(func=cmd_ls)

    c = sub.add_parser("cp", help="copy a recipe to edit it")
    c.add_argument("recipe")
    c.add_argument("dest")
    c.add_argument("--force", action="store_true")
    c.set_defaults(func=cmd_cp)

    x = sub.add_parser("export", help="(re-)export the learned prompts of a run from its last checkpoint")
    x.add_argument("run_dir")
    x.add_argument("--out", help="destination (default RUN_DIR/prompts)")
    x.set_defaults(func=cmd_export)

    i = sub.add_parser(
        "interpret",
        help="nearest vocabulary tokens to each learned context vector (equal distances: by token id)",
    )
    i.add_argument("prompts_dir", help="PROMPTS_DIR, or a RUN_DIR holding prompts/")
    i.add_argument("--topk", type=int, default=5)
    i.add_argument("--pretrained", help="weights to load if not the ones recorded in prompt_config.json")
    i.set_defaults(func=cmd_interpret)

    _add_import_command(sub, "import", None)
    _add_import_command(sub, "import-coop", "coop")

    from promptlab.anomaly.cli import add_anomaly_commands
    from promptlab.cli_data import add_data_commands
    from promptlab.report import add_report_command
    from promptlab.sweep_cli import add_sweep_command

    add_data_commands(sub)
    add_sweep_command(sub)
    add_report_command(sub)
    add_anomaly_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from promptlab.trust import trust_modules

    trust_modules(args.trust_module)  # in the environment too: sweep jobs and torchrun ranks inherit it

    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if args.debug:
            raise
        code, message = describe_error(e)
        print(f"promptlab: error: {message}", file=sys.stderr)
        if code == EXIT_FAILED:
            print("promptlab: this looks like a bug; rerun with --debug for the traceback", file=sys.stderr)
        return code


def describe_error(e: BaseException) -> tuple[int, str]:
    """The exit code (see the module docstring) and the one-line message for an error a command raised."""
    from PIL import Image

    from promptlab.config import ConfigError

    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # KeyError's str() adds quotes
    text = text.strip() or type(e).__name__
    first = text.splitlines()[0]
    if isinstance(e, FloatingPointError):
        return EXIT_DIVERGED, text
    if isinstance(e, Image.DecompressionBombError):
        return EXIT_IO, f"{text} (raise PIL.Image.MAX_IMAGE_PIXELS only for images you trust)"
    if isinstance(e, FileNotFoundError):  # a path the command, recipe or dataset YAML names
        return EXIT_INVALID, text
    if isinstance(e, OSError):
        return EXIT_IO, text
    if isinstance(e, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return EXIT_IO, f"cannot write a file: disk full or not writable ({first})"
    if isinstance(e, (ConfigError, ValueError, KeyError, RuntimeError)):
        return EXIT_INVALID, text
    return EXIT_FAILED, f"{type(e).__name__}: {first}"


if __name__ == "__main__":
    sys.exit(main())
