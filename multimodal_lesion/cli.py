"""``mmlesion``: thin sub-commands that parse, call the library and print.

Heavy libraries (torch, timm, shap, grad-cam) are imported inside the commands, so ``--help`` is instant.
A user's mistake (bad data, bad config, not a run folder) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable

from .errors import MMLesionError

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], object], Command]] = {}


def command(
    name: str, help: str, add_args: Callable[[argparse.ArgumentParser], object]
) -> Callable[[Command], Command]:
    """Register a sub-command: its help line, its arguments and the function that runs it."""

    def wrap(fn: Command) -> Command:
        COMMANDS[name] = (help, add_args, fn)
        return fn

    return wrap


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML experiment file (default: built-in defaults)")
    p.add_argument("--data", help="HAM10000 root (default: the synthetic dataset)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable",
    )


def _load_cfg(args: argparse.Namespace):
    from .config import load_config, replace

    cfg = load_config(args.config, args.overrides)
    return replace(cfg, data={"root": str(args.data)}) if getattr(args, "data", None) else cfg


@command(
    "synth",
    "write the synthetic HAM10000-shaped dataset",
    lambda p: (
        p.add_argument("--out", required=True),
        p.add_argument("--n", type=int, default=1000),
        p.add_argument("--seed", type=int, default=0),
    ),
)
def _synth(args: argparse.Namespace) -> int:
    from .data.synthetic import make_synthetic

    print(make_synthetic(args.out, n=args.n, seed=args.seed))
    return 0


@command(
    "eda",
    "class balance, age / sex / localization by class, missing values",
    lambda p: (
        p.add_argument("--data", required=True),
        p.add_argument("--out", required=True),
        p.add_argument("--drop-missing", action="store_true"),
    ),
)
def _eda(args: argparse.Namespace) -> int:
    from .data.ham10000 import read_ham10000
    from .report.eda import run_eda

    ham = read_ham10000(args.data, drop_missing=args.drop_missing)
    _print_notes(ham.notes)
    summary = run_eda(ham.metadata, args.out)
    print(json.dumps({k: summary[k] for k in ("n_images", "n_lesions", "class_counts")}))
    print(f"wrote {args.out}")
    return 0


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, default=0)
    p.add_argument("--test-size", type=float, default=0.15)
    p.add_argument("--val-size", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drop-missing", action="store_true")


@command("split", "lesion-grouped, class-stratified train/val/test split (and folds)", _split_args)
def _split(args: argparse.Namespace) -> int:
    from .data.ham10000 import read_ham10000
    from .data.splits import split_lesions
    from .io import atomic_write

    ham = read_ham10000(args.data, drop_missing=args.drop_missing)
    _print_notes(ham.notes)
    splits = split_lesions(
        ham.metadata, test_size=args.test_size, val_size=args.val_size, folds=args.folds, seed=args.seed
    )
    with atomic_write(args.out) as fh:
        splits.to_csv(fh, index=False)
    counts = splits.groupby("split")["lesion_id"].nunique().to_dict()
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v} lesions" for k, v in sorted(counts.items())))
    return 0


@command("models", "list the registered models", lambda p: None)
def _models(args: argparse.Namespace) -> int:
    from .models import list_models, model_description

    for name in list_models():
        print(f"{name:16s} {model_description(name)}")
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")


@command("train", "train one model and write a run folder", _train_args)
def _train(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args)  # config mistakes fail before the heavy imports
    from .workflows import train_run

    metrics = train_run(cfg, args.out, resume=args.resume)
    _print_headline(metrics)
    print(f"wrote {args.out}")
    return 0


@command(
    "evaluate",
    "metrics and figures of a run on one split",
    lambda p: (
        p.add_argument("--run", required=True),
        p.add_argument("--data"),
        p.add_argument("--split", default="test", choices=["train", "val", "test"]),
        p.add_argument("--tta", action="store_true", help="average over flips"),
    ),
)
def _evaluate(args: argparse.Namespace) -> int:
    from .workflows import evaluate_run

    metrics, path = evaluate_run(args.run, args.split, args.data, tta=args.tta)
    _print_headline(metrics, (args.split,))
    print(f"wrote {path}")
    return 0


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--age", type=float)
    p.add_argument("--sex")
    p.add_argument("--localization")
    p.add_argument(
        "--balanced",
        action="store_true",
        help="probabilities of the balanced decision fitted on val (uniform class prior)",
    )


@command("predict", "class probabilities of one image (+ optional patient fields) as JSON", _predict_args)
def _predict(args: argparse.Namespace) -> int:
    from .runs import predict_image

    print(
        json.dumps(
            predict_image(args.run, args.image, args.age, args.sex, args.localization, balanced=args.balanced), indent=2
        )
    )
    return 0


def _explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True)
    p.add_argument("--data")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--cases", nargs="+", metavar="ID", help="image ids to explain")
    p.add_argument("--n", type=int, help="number of cases (default: explain.n_cases of the run)")
    p.add_argument("--out", required=True)


@command("explain", "Grad-CAM + grouped SHAP + image-vs-metadata report of a run", _explain_args)
def _explain(args: argparse.Namespace) -> int:
    from .workflows import explain_run

    index = explain_run(args.run, args.out, data=args.data, split=args.split, cases=args.cases, n=args.n)
    print(f"wrote {index}")
    return 0


def _ablate_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the cells as Ray tasks on this cluster (sets ablation.backend = 'ray' and ray.address)",
    )


@command("ablate", "every model over lesion-grouped folds x seeds, with CIs and subgroups", _ablate_args)
def _ablate(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args)
    if args.ray_address:
        from .config import replace

        cfg = replace(cfg, ablation={"backend": "ray"}, ray={"address": args.ray_address})
    from .ablation import run_ablation

    paths = run_ablation(cfg, args.out)
    print(paths["summary_md"].read_text())
    print(f"wrote {args.out}")
    return 0


@command(
    "demo",
    "synthetic data -> EDA -> small ablation -> explanation report (the README's main job)",
    lambda p: (
        p.add_argument("--data", help="HAM10000 root (default: the synthetic dataset)"),
        p.add_argument("--out", default="mmlesion-demo"),
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"),
    ),
)
def _demo(args: argparse.Namespace) -> int:
    from importlib.resources import as_file, files

    from .config import load_config, replace
    from .demo import run_demo

    with as_file(files("multimodal_lesion").joinpath("demo.toml")) as demo_toml:
        cfg = load_config(demo_toml, args.overrides)
    cfg = replace(cfg, data={"root": str(args.data)}) if args.data else cfg
    result = run_demo(cfg, args.out)
    test = result.pop("test")
    print(f"\ndone in {result['seconds']} s on {result['n_images']} images")
    print(
        f"best fusion model: {result['best_fusion']}: test balanced accuracy {test['balanced_accuracy']:.3f}, "
        f"macro AUROC {test['macro_auroc']:.3f} ({test['n_images']} images, {test['n_lesions']} lesions)"
    )
    for key in ("eda", "ablation_summary", "comparison", "report"):
        print(f"{key:17s} {result[key]}")
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--json", help="write the figures (with the machine) to this JSON file")
    p.add_argument("--size", action="append", default=[], metavar="KEY=VALUE", help="sample sizes, e.g. train_steps=20")
    p.add_argument("--sections", nargs="+", metavar="NAME", help="data training embeddings ablation explanations")
    p.add_argument("--tiny", action="store_true", help="a tiny synthetic input (seconds): checks the harness runs")


@command("bench", "throughput and memory of each stage against the naive way, measured in one run", _bench_args)
def _bench(args: argparse.Namespace) -> int:
    from .bench import TINY_SIZES, format_table, parse_sizes, run_benchmark

    sizes = parse_sizes(args.size, TINY_SIZES if args.tiny else None) if args.size else None
    results = run_benchmark(
        args.data,
        args.json,
        tiny=args.tiny,
        config=args.config,
        overrides=args.overrides,
        sections=args.sections,
        sizes=sizes,
    )
    print(format_table(results))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def _print_headline(metrics: dict, splits: tuple[str, ...] = ("val", "test")) -> None:
    for split in (s for s in splits if s in metrics):
        m, b = metrics[split]["calibrated"], metrics[split]["balanced"]
        print(
            f"{split}: balanced accuracy {m['balanced_accuracy']:.4f} ({b['balanced_accuracy']:.4f} with the "
            f"balanced decision)  macro AUROC {m['macro_auroc']:.4f}  melanoma AUROC "
            f"{m['melanoma_auroc']:.4f}  ECE {m['ece']:.4f}  ({m['n_images']} images, "
            f"{m['n_lesions']} lesions)"
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``mmlesion`` argument parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="mmlesion",
        description="Skin-lesion classification from a dermoscopic image and patient metadata, "
        "explained jointly (Grad-CAM + SHAP). Start with `mmlesion demo`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a sub-command; user mistakes become one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*decompression bomb.*")  # our own pixel limit reports it
    try:
        return args.func(args)
    except MMLesionError as exc:
        print(f"mmlesion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmlesion {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
