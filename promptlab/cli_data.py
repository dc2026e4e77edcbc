"""`promptlab data list | fewshot | check | prepare`: inspect, export and verify datasets from the shell.

`cli.py` calls `add_data_commands(subparsers)`; every subcommand sets `args.func(args) -> int`
(the exit code). `main_data(argv)` runs the same commands standalone, for tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from promptlab.data.items import SPLITS


def add_data_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `data` and its subcommands on a parent parser's subparsers."""
    data = subparsers.add_parser("data", help="list, export and check datasets")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="{list,fewshot,check,prepare}")

    p = sub.add_parser("list", help="show the known datasets")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("fewshot", help="write a few-shot split (CoOp protocol) as a split-file JSON")
    p.add_argument("root", help="data root ($DATA)")
    p.add_argument("name", help="dataset name or YAML path")
    p.add_argument("--shots", type=int, required=True, help="images per class; 0 for all data")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--subsample", choices=("all", "base", "new"), default="all")
    p.add_argument("--out", default="-", help="output JSON file ('-' for stdout)")
    p.set_defaults(func=cmd_fewshot)

    p = sub.add_parser("check", help="check datasets on disk and say how to fix what is missing")
    p.add_argument("root", help="data root ($DATA)")
    p.add_argument("names", nargs="*", help="datasets to check (default: every known dataset found)")
    p.add_argument("--full", action="store_true", help="decode every image, not a sample")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "prepare",
        help="download, verify and lay out datasets in CoOp's layout, then check them",
        description="Fetch each dataset's files into ROOT/downloads/ (resumable, checksums verified), "
        "extract them into CoOp's DATASETS.md layout and run `data check`. ImageNet and Stanford Cars "
        "are guided: the command says which files to get by hand and where to put them.",
    )
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="datasets to prepare, or 'all' (the 11 and the ImageNet shifts)",
    )
    p.add_argument("--root", help="data root ($DATA)")
    p.add_argument(
        "--url", action="append", default=[], metavar="FILE=URL", help="fetch FILE from a mirror (repeatable)"
    )
    p.add_argument(
        "--no-check", action="store_true", help="skip the final `data check` (it decodes a sample of images)"
    )
    p.add_argument("--delete-archives", action="store_true", help="remove each archive once it is extracted")
    p.add_argument("--list", action="store_true", help="show every dataset's files and where they come from")
    p.set_defaults(func=cmd_prepare)
    return data


def cmd_list(args: argparse.Namespace) -> int:
    """Print one line per known dataset: name, folder, classes, template."""
    from promptlab.data import dataset_names, get_spec

    for name in dataset_names():
        spec = get_spec(name)
        classes = spec.num_classes if spec.num_classes is not None else "-"
        kind = "test only" if spec.test_only else spec.reader
        print(f"{name:16} {spec.folder + '/':28} {classes!s:>5} classes  {kind:16} {spec.template}")
    return 0


def cmd_fewshot(args: argparse.Namespace) -> int:
    """Draw and write the split: paths relative to the image folder, labels after relabelling."""
    from promptlab.data import fewshot_split, load_dataset, subsample_classes
    from promptlab.data.items import dump_split_json, items_to_rows

    try:
        ds = load_dataset(args.name, args.root)
    except (KeyError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ds = subsample_classes(fewshot_split(ds, args.shots, args.seed), args.subsample)
    split = {s: items_to_rows(ds.split(s), ds.image_dir) for s in SPLITS}
    text = dump_split_json(split)
    if args.out == "-":
        print(text, end="")
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        sizes = ", ".join(f"{s} {len(split[s])}" for s in SPLITS)
        print(
            f"{ds.name}: {args.shots}-shot seed {args.seed} {args.subsample}: {ds.num_classes} classes, "
            f"{sizes} -> {args.out}",
            file=sys.stderr,
        )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Check the named datasets (or every known one present); non-zero exit on any problem.

    Without names, datasets whose folder is absent are listed as not found but are not errors:
    nobody has all fifteen. Named datasets must be present.
    """
    from promptlab.data import dataset_names
    from promptlab.data.check import check_dataset  # reads images: torch, imported per command

    names = args.names or dataset_names()
    failed = found = 0
    for name in names:
        try:
            report = check_dataset(name, args.root, full=args.full)
        except (KeyError, FileNotFoundError, ValueError) as e:
            print(f"{name}: ERROR {e}")
            failed += 1
            continue
        if not report.found and not args.names:
            print(f"{report.name}: not found")
            continue
        found += report.found
        sizes = " / ".join(f"{report.counts.get(s, 0)} {s}" for s in SPLITS)
        status = "ok" if report.ok else "PROBLEMS"
        classes = f"{report.num_classes} classes (expected {report.expected_classes or '-'})"
        print(f"{report.name}: {status}: {classes}, {sizes}" if report.counts else f"{report.name}: {status}")
        for problem in report.problems:
            print(f"  - {problem}")
        failed += not report.ok
    if not args.names and not found:
        print(f"no known dataset found under {args.root}")
        return 1
    return 1 if failed else 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Prepare each named dataset; exit 0 when all are ready, 1 when one needs a hand or failed."""
    from promptlab.data.prepare import PLANS, describe_plans, get_plan, parse_url_overrides, prepare_dataset

    if args.list:
        print(describe_plans())
        return 0
    if not args.names or not args.root:
        raise ValueError(
            "give the datasets and the data root: promptlab data prepare NAME [NAME ...] --root $DATA (NAME may be 'all')"
        )
    names = list(PLANS) if args.names == ["all"] else args.names
    for name in names:
        get_plan(name)  # unknown names fail before anything is downloaded
    urls = parse_url_overrides(args.url)
    failed = 0
    for name in names:
        print(f"{name}: preparing under {args.root}", file=sys.stderr)
        out = prepare_dataset(
            name, args.root, urls=urls, check=not args.no_check, delete_archives=args.delete_archives
        )
        for note in out.notes:
            print(f"{name}: note: {note}")
        if out.ready:
            print(f"{name}: ready" + ("" if args.no_check else " (data check passed)"))
            continue
        failed += 1
        print(f"{name}: NOT READY")
        for problem in out.problems:
            print("  - " + problem.replace("\n", "\n    "))
    return 1 if failed else 0


def main_data(argv: list[str] | None = None) -> int:
    """Run `promptlab data ...` with `argv` (the words after `data`; a leading "data" is allowed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["data"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="promptlab")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main_data())
