"""``mmlesion``: thin sub-commands that parse, call the library and print.

Heavy libraries (torch, timm, shap, grad-cam) are imported inside the commands, so ``--help`` is instant.
A user's mistake (bad data, bad config, bad option, bad output path, not a run folder) ends with one
line on stderr and exit code 2. Every command checks its output path (and locks its output folder)
before it reads data or trains anything; a config mistake is found before that.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from .config import MIN_SYNTHETIC_N, Range
from .errors import ConfigError, MMLesionError, Note
from .io import output_file, output_folder

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


class _Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one line, ``mmlesion COMMAND: error: ...``, and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(kind: type[int] | type[float], allowed: Range) -> Callable[[str], int | float]:
    """An argparse ``type``: the option's value parsed as ``kind`` and within ``allowed`` (the config's Range)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value) or not allowed.holds(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return parse


def _age(text: str) -> float:
    """An argparse ``type`` for ``--age``: the data layer's one age rule (the CSV reader's), not a copy."""
    from .data.patient import parse_age

    try:
        return parse_age(text, "", missing_ok=False)
    except MMLesionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _path(text: str) -> str:
    """An argparse ``type`` for paths: an empty one (``--out "$OUT"`` with OUT unset) is refused, not read as '.'."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path")
    return text


POSITIVE = _checked(int, Range(1))
SEED = _checked(int, Range(0))
SHARE = _checked(float, Range(0, 1, low_open=True, high_open=True))


def _schema_args(p: argparse.ArgumentParser, drop_missing: bool = True) -> argparse.ArgumentParser:
    """The dataset options of every command that reads data: schema, image root, duplicates (and --drop-missing)."""
    p.add_argument(
        "--schema",
        metavar="NAME|FILE.toml",
        help="dataset schema: ham10000 (default), isic2019, isic2020, pad_ufes_20, or a schema TOML file",
    )
    p.add_argument(
        "--images", metavar="DIR", help="folder the images are below, when not the data root; 'none': no images"
    )
    p.add_argument(
        "--duplicates", type=_path, metavar="FILE", help="CSV of image pairs of one lesion (kept in one group)"
    )
    if drop_missing:
        p.add_argument("--drop-missing", action="store_true", help="drop (and report) listed images not found")
    return p


def _data_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``data.*`` settings of the dataset options given (files made absolute: a run may be reloaded elsewhere)."""
    settings: dict[str, Any] = {}
    schema = getattr(args, "schema", None)
    if schema:
        is_file = schema.endswith(".toml") or "/" in schema
        settings["schema"] = str(Path(schema).resolve()) if is_file else schema
    images = getattr(args, "images", None)
    if images:
        settings["images"] = images if images == "none" else str(Path(images).resolve())
    if getattr(args, "duplicates", None):
        settings["duplicates"] = str(Path(args.duplicates).resolve())
    if getattr(args, "drop_missing", False):
        settings["drop_missing"] = True
    if getattr(args, "splits", None):
        settings["splits"] = str(Path(args.splits).resolve())
    if getattr(args, "allow_leaks", False):
        settings["allow_leaks"] = True
    return settings


def _config_args(p: argparse.ArgumentParser, dataset_options: bool = True) -> None:
    p.add_argument(
        "--config",
        type=_path,
        metavar="PRESET|FILE.toml",
        help="a preset (see `mmlesion presets`) or a TOML experiment file (default: built-in defaults)",
    )
    p.add_argument("--data", type=_path, help="data root (default: the synthetic HAM10000-shaped dataset)")
    if dataset_options:
        _schema_args(p)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable",
    )
    if dataset_options:
        p.add_argument("--splits", type=_path, metavar="FILE", help="CSV of image id and split or fold: your own split")
        p.add_argument("--allow-leaks", action="store_true", help="accept a given split that puts a group on two sides")


def _load_cfg(args: argparse.Namespace):
    from .api import load_config
    from .config import replace
    from .data.schema_file import resolve_schema

    cfg = load_config(args.config, args.overrides)
    data = _data_settings(args) | ({"root": str(args.data)} if getattr(args, "data", None) else {})
    cfg = replace(cfg, data=data) if data else cfg
    resolve_schema(cfg.data.schema, duplicates=cfg.data.duplicates)  # a bad schema file fails before any output
    return cfg


def _mlflow_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mlflow",
        type=_path,
        metavar="URI",
        help="also track it in MLflow: a folder (a local file store, e.g. mlruns) or a tracking URI "
        "(sets tracking.mlflow_uri; needs the mlflow extra)",
    )


def _tracking(cfg: Any, args: argparse.Namespace) -> Any:
    """``cfg`` with ``--mlflow`` applied; the tracking URI checked before any work, its error naming its source."""
    from .config import replace
    from .tracking import CONFIG_KEY, OPTION, check_tracking

    if args.mlflow:
        cfg = replace(cfg, tracking={"mlflow_uri": args.mlflow})
    check_tracking(cfg.tracking.mlflow_uri, OPTION if args.mlflow else CONFIG_KEY)
    return cfg


def _dataset(args: argparse.Namespace):
    """The ``data`` config section and the schema the dataset options name (a bad schema fails here)."""
    from .config import ExperimentConfig, replace
    from .data.schema_file import resolve_schema

    d = replace(ExperimentConfig(), data=_data_settings(args)).data
    return d, resolve_schema(d.schema, duplicates=d.duplicates)


def _read_options(args: argparse.Namespace) -> dict[str, Any]:
    """The dataset options (``--schema``, ``--images``, ...) as keyword arguments of ``read_dataset``."""
    d, _ = _dataset(args)  # a bad schema fails here
    return {"schema": d.schema, "images": d.images, "duplicates": d.duplicates, "drop_missing": d.drop_missing}


def _read_data(args: argparse.Namespace):
    """The dataset of ``--data`` read with the dataset options (``--schema``, ``--images``, ...)."""
    from .api import read_dataset

    return read_dataset(args.data, **_read_options(args))


@command(
    "synth",
    "write the synthetic HAM10000-shaped dataset",
    lambda p: (
        p.add_argument("--out", type=_path, required=True),
        p.add_argument("--n", type=POSITIVE, default=1000, help=f"images (a run needs {MIN_SYNTHETIC_N} or more)"),
        p.add_argument("--seed", type=SEED, default=0),
    ),
)
def _synth(args: argparse.Namespace) -> int:
    with output_folder(args.out, lock=False):  # the dataset is swapped into place as a whole
        from .data.synthetic import make_synthetic

        print(make_synthetic(args.out, n=args.n, seed=args.seed))
    return 0


@command(
    "eda",
    "class balance, every patient feature by class, missing values",
    lambda p: (
        p.add_argument("--data", type=_path, required=True),
        p.add_argument("--out", type=_path, required=True),
        _schema_args(p),
    ),
)
def _eda(args: argparse.Namespace) -> int:
    from .api import eda

    summary = eda(args.data, args.out, **_read_options(args))
    print(json.dumps({k: summary[k] for k in ("n_images", "n_lesions", "class_counts")}))
    print(f"wrote {args.out}")
    return 0


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=_path, required=True)
    p.add_argument("--out", type=_path, required=True)
    p.add_argument("--folds", type=_checked(int, Range(2, also=(0,))), default=0)
    p.add_argument("--test-size", type=SHARE, default=0.15)
    p.add_argument("--val-size", type=SHARE, default=0.15)
    p.add_argument("--seed", type=SEED, default=0)
    _schema_args(p)


@command("split", "lesion-grouped, class-stratified train/val/test split (and folds)", _split_args)
def _split(args: argparse.Namespace) -> int:
    from .io import atomic_write

    if not args.folds and args.test_size + args.val_size >= 1:
        raise ConfigError(
            f"--test-size {args.test_size:g} + --val-size {args.val_size:g} must be < 1 to leave training data"
        )
    _, schema = _dataset(args)
    with output_file(args.out, option="--out", inputs=[Path(args.data) / name for name in schema.metadata]):
        from .api import split

        dataset = _read_data(args)
        splits = split(dataset, test_size=args.test_size, val_size=args.val_size, folds=args.folds, seed=args.seed)
        with atomic_write(args.out) as fh:
            splits.to_csv(fh, index=False)
    counts = splits.groupby("split")["lesion_id"].nunique().to_dict()
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v} {dataset.schema.group_noun}" for k, v in sorted(counts.items())))
    return 0


@command("models", "list the registered models", lambda p: None)
def _models(args: argparse.Namespace) -> int:
    from .api import list_models
    from .models import model_description

    for name in list_models():
        print(f"{name:16s} {model_description(name)}")
    return 0


@command("presets", "list the preset configs (--config NAME)", lambda p: None)
def _presets(args: argparse.Namespace) -> int:
    from .config import list_presets, preset_text

    for name in list_presets():
        first = next((line for line in preset_text(name).splitlines() if line.startswith("#")), "#")
        print(f"{name:20s} {first.lstrip('# ').strip()}")
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--out", type=_path, required=True)
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (same settings and data)")
    again.add_argument("--overwrite", action="store_true", help="replace the run in OUT (its files are removed first)")
    _mlflow_arg(p)


@command("train", "train one model and write a run folder", _train_args)
def _train(args: argparse.Namespace) -> int:
    from .api import train

    cfg = _tracking(_load_cfg(args), args)  # config mistakes fail before the output is touched and the heavy imports
    run = train(cfg, out=args.out, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone writes the run
        _print_headline(run.metrics.to_dict())
    print(f"wrote {args.out}")
    return 0


FIT_HELP = "images of another aspect ratio than the run's input: pad (default) or centre crop; stretch only if asked"
ADAPT_BN_HELP = "re-estimate the run's batch-norm statistics on these unlabelled images first (AdaBN; end2end/partial)"


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where the model runs (default: the run's own; a GPU run runs on the CPU where there is none)",
    )


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=_path, required=True)
    p.add_argument(
        "--data",
        type=_path,
        help="the run's data at another root (scored on --split), or a dataset the run never saw (external)",
    )
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--tta", action="store_true", help="average over flips")
    _schema_args(p)  # --schema: of --data when it is external (default: the run's); --images, --duplicates
    p.add_argument("--key-vs-rest", action="store_true", help="external: score the run's key class vs the rest")
    p.add_argument("--fit", choices=["pad", "crop", "stretch"], default="pad", help="external: " + FIT_HELP)
    p.add_argument(
        "--exclude-seen", action="store_true", help="external: leave out images in the run's splits (else refused)"
    )
    p.add_argument("--adapt-bn", action="store_true", help="external: " + ADAPT_BN_HELP)
    _prior_args(p)
    p.add_argument(
        "--estimate-prior",
        action="store_true",
        help="external: estimate OTHER's class prevalence by EM and score it (a diagnostic: wrong when the images "
        "look different)",
    )
    _device_arg(p)
    _mlflow_arg(p)


def _prior_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prior",
        metavar="FILE|CLASS=P,...",
        help="the clinic's known class prevalence (CSV/TOML of class,prevalence or e.g. mel=0.015; classes left "
        "out keep their training proportions): probabilities re-weighted to it",
    )
    p.add_argument(
        "--shift-level",
        type=_checked(float, Range(0.0, 1.0, low_open=True, high_open=True)),
        default=0.01,
        help="level of the per-image shift alarm: images like the run's are flagged at most this often (0.01)",
    )


@command(
    "evaluate",
    "metrics and figures of a run on one split, or on a dataset it never saw (external validation)",
    _evaluate_args,
)
def _evaluate(args: argparse.Namespace) -> int:
    from .api import load_run

    run = load_run(args.run, device=args.device)
    if args.mlflow:
        from .tracking import OPTION, check_tracking

        check_tracking(args.mlflow, OPTION)
    if (args.key_vs_rest or args.exclude_seen or args.schema or args.prior or args.estimate_prior) and not args.data:
        raise ConfigError(
            "--schema, --key-vs-rest, --exclude-seen, --prior and --estimate-prior score other data: "
            "give it with --data"
        )
    evaluation = run.evaluate(
        args.data,
        args.split,
        args.schema,
        tta=args.tta,
        key_vs_rest=args.key_vs_rest,
        exclude_seen=args.exclude_seen,
        fit=args.fit,
        images=args.images or "",
        duplicates=args.duplicates or "",
        drop_missing=args.drop_missing,
        show=True,
        mlflow=args.mlflow or "",
        adapt_bn=args.adapt_bn,
        prior=args.prior or "",
        estimate_prior=args.estimate_prior,
        shift_level=args.shift_level,
    )
    _print_headline(evaluation.metrics, (evaluation.split,))
    _print_trust(evaluation.metrics, evaluation.split)
    near = evaluation.metrics.get("near_duplicates_of_training")
    if near is not None:
        print(
            f"{near['n_images']} image(s) of {args.data} are near-duplicates of the run's training images "
            f"(score >= {near['threshold']:g})" + (f": {', '.join(near['images'][:10])}" if near["images"] else "")
        )
        if near["n_images"] and near["without_them"]:
            _print_headline(
                {"without them": near["without_them"], "key_class": evaluation.metrics.get("key_class")},
                ("without them",),
            )
    ci = evaluation.values.get("key_vs_rest", {}).get("auroc_ci")
    if ci:
        print(
            f"key class vs rest: AUROC {ci['auroc']:.4f} [{ci['ci_low']:.4f}, {ci['ci_high']:.4f}] "
            f"({ci['ci']:.0%} CI over {ci['n_groups']} {ci['grouped_by']}s; {ci['n_positive']} positives in "
            f"{ci['n_positive_groups']} {ci['grouped_by']}s)"
        )
    print(f"wrote {evaluation.path}")
    return 0


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=_path, required=True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", type=_path, help="one image: JSON on stdout")
    what.add_argument("--data", type=_path, help="every image below this folder: a CSV (--out)")
    what.add_argument("--csv", type=_path, help="a CSV of cases ('image' column + patient features): a CSV (--out)")
    p.add_argument("--out", type=_path, help="the CSV of probabilities written for --data / --csv")
    p.add_argument("--age", type=_age, help="years (0 to 120), for a run with an 'age' feature; omit when unknown")
    p.add_argument("--sex", help="for a run with a 'sex' feature (other features: --field)")
    p.add_argument("--localization", help="for a run with a 'localization' feature (other features: --field)")
    p.add_argument(
        "--field",
        dest="fields",
        action="append",
        default=[],
        metavar="FEATURE=VALUE",
        help="another patient feature of the run's schema; repeatable",
    )
    p.add_argument(
        "--balanced",
        action="store_true",
        help="probabilities of the balanced decision fitted on val (uniform class prior)",
    )
    p.add_argument("--fit", choices=["pad", "crop", "stretch"], default="pad", help=FIT_HELP)
    p.add_argument("--adapt-bn", action="store_true", help="--data / --csv: " + ADAPT_BN_HELP)
    _prior_args(p)
    _device_arg(p)


@command(
    "predict",
    "one image's class probabilities, prediction sets and TTA spread (JSON), or many images' (CSV, one model load)",
    _predict_args,
)
def _predict(args: argparse.Namespace) -> int:
    if args.image is None:
        return _predict_many(args)
    if args.out:
        raise ConfigError("--out is for --data / --csv; --image prints JSON")
    if args.adapt_bn:
        raise ConfigError(
            "--adapt-bn re-estimates statistics over a set of new images: use --data or --csv, not --image"
        )
    from .api import load_run

    fields = dict(_field(f) for f in args.fields)
    fields.update({k: v for k in ("age", "sex", "localization") if (v := getattr(args, k)) is not None})
    run = load_run(args.run, device=args.device)
    prediction = run.predict(args.image, prior=args.prior or "", shift_level=args.shift_level, **fields)
    if args.balanced and prediction.balanced_probabilities is None:
        run.predictor.run.require_balanced()  # a run trained before the balanced decision: one line, exit 2
    print(json.dumps(prediction.to_json(balanced=args.balanced), indent=2))
    return 0


def _field(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"--field {text!r}: expected FEATURE=VALUE")
    return name.strip(), value


def _predict_many(args: argparse.Namespace) -> int:
    if not args.out:
        raise ConfigError("--data / --csv write a CSV: give its path with --out")
    given = [o for o in ("age", "sex", "localization", "balanced") if getattr(args, o)] + (
        ["field"] if args.fields else []
    )
    if given:
        raise ConfigError(
            f"--{given[0]} is for one --image; a --csv gives patient fields per row (the CSV has both decisions)"
        )
    from .api import load_run
    from .errors import DataError
    from .io import atomic_write

    run = load_run(args.run, device=args.device)
    inputs = [args.csv] if args.csv else []
    with output_file(args.out, option="--out", inputs=inputs):
        if args.data and not Path(args.data).is_dir():
            raise DataError(f"{args.data}: not a folder of images")
        table = run.predict_table(
            args.data or args.csv,
            fit=args.fit,
            adapt_bn=args.adapt_bn,
            prior=args.prior or "",
            shift_level=args.shift_level,
        )
        with atomic_write(args.out) as fh:
            table.to_csv(fh, index=False)
    print(f"predicted {len(table)} images; wrote {args.out}")
    empty = [c for c in table.columns if c.startswith("empty_set_")]
    for column in empty[:1]:
        level = column.removeprefix("empty_set_")
        print(f"{int(table[column].sum())} image(s) with an empty {level} prediction set ({EMPTY_SET_MEANING})")
    if "out_of_distribution" in table.columns:
        print(
            f"{int(table['out_of_distribution'].sum())} image(s) flagged out of distribution (shift_p <= "
            f"{args.shift_level:g}; images like the run's are flagged at most that often)"
        )
    return 0


def _explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=_path, required=True)
    p.add_argument("--data", type=_path)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--cases", nargs="+", metavar="ID", help="image ids to explain")
    p.add_argument("--n", type=POSITIVE, help="number of cases (default: explain.n_cases of the run)")
    p.add_argument("--out", type=_path, required=True)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="explain.KEY=VALUE",
        help="override one explain setting of the run (e.g. explain.faithfulness_cases=100); repeatable",
    )


def _explain_settings(pairs: list[str]) -> dict[str, Any]:
    """The ``explain.*`` overrides, checked like any config value; another section is refused."""
    from .config import load_config, parse_overrides

    sections = parse_overrides(pairs)
    other = next((p for p in pairs if p.partition("=")[0].strip().split(".")[0] != "explain"), None)
    if other is not None:
        raise ConfigError(f"--set {other}: mmlesion explain takes explain.* settings only (the run fixes the rest)")
    load_config(None, pairs)  # ranges and types, naming the pair
    return sections.get("explain", {})


@command("explain", "Grad-CAM + grouped SHAP + image-vs-metadata report of a run", _explain_args)
def _explain(args: argparse.Namespace) -> int:
    from .api import Run

    settings = _explain_settings(args.overrides)
    run = Run(args.run)  # checked once --out is (the report's folder comes first, as for every command)
    report = run.explain(
        args.n, out=args.out, cases=args.cases, split=args.split, data=args.data, settings=settings, show=True
    )
    print(f"wrote {report.index}")
    return 0


def _ablate_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--out", type=_path, required=True)
    p.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the cells as Ray tasks on this cluster (sets ablation.backend = 'ray' and ray.address)",
    )
    _mlflow_arg(p)


@command("ablate", "every model over lesion-grouped folds x seeds, with CIs and subgroups", _ablate_args)
def _ablate(args: argparse.Namespace) -> int:
    from .api import ablate

    cfg = _tracking(_load_cfg(args), args)
    result = ablate(cfg, out=args.out, ray_address=args.ray_address)
    print(result.summary)
    print(f"wrote {args.out}")
    return 0


@command(
    "demo",
    "synthetic data -> EDA -> small ablation -> explanation report (the README's main job)",
    lambda p: (
        p.add_argument("--data", type=_path, help="HAM10000 root (default: the synthetic dataset)"),
        p.add_argument("--out", type=_path, default="mmlesion-demo"),
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"),
    ),
)
def _demo(args: argparse.Namespace) -> int:
    from .api import load_config
    from .config import replace

    cfg = load_config("demo", args.overrides)
    cfg = replace(cfg, data={"root": str(args.data)}) if args.data else cfg
    with output_folder(args.out):
        from .demo import run_demo

        result = run_demo(cfg, args.out)
    test = result.pop("test")
    print(f"\ndone in {result['seconds']} s on {result['n_images']} images")
    print(
        f"best fusion model: {result['best_fusion']}: test balanced accuracy {test['balanced_accuracy']:.3f}"
        f"{_interval(test)}, "
        f"macro AUROC {test['macro_auroc']:.3f} ({test['n_images']} images, {test['n_lesions']} "
        f"{result.get('groups', 'lesions')})"
    )
    for key in ("eda", "ablation_summary", "comparison", "report"):
        print(f"{key:17s} {result[key]}")
    return 0


def _duplicates_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)  # --config / --set: the embedding pass (backbone, image size): the training run's hits its cache
    p.add_argument("--out", type=_path, required=True)
    p.add_argument("--against", type=_path, metavar="OTHER", help="another dataset: list pairs across the two")
    p.add_argument("--other-schema", metavar="NAME|FILE.toml", help="OTHER's schema (default: --schema's)")
    p.add_argument("--other-images", metavar="DIR", help="folder OTHER's images are below, when not its root")
    p.add_argument(
        "--threshold", type=_checked(float, Range(-1, 3)), help="score at or above which pairs go to duplicates.csv"
    )
    p.add_argument("--neighbours", type=POSITIVE, default=10, help="embedding neighbours verified per image")
    p.add_argument(
        "--patient-neighbours",
        type=POSITIVE,
        default=30,
        help="and nearest among the images whose patient features agree",
    )
    p.add_argument("--top", type=POSITIVE, default=5, help="candidates kept per image")


@command(
    "duplicates",
    "near-duplicate images under two group ids or across two datasets: pairs.csv, review.html, duplicates.csv",
    _duplicates_args,
)
def _duplicates(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args)
    if (args.other_schema or args.other_images) and not args.against:
        raise ConfigError("--other-schema / --other-images describe --against OTHER: give it")
    with output_folder(args.out):
        from .data.reader import read_dataset
        from .data.schema_file import resolve_schema
        from .runs import resolve_data
        from .runs.duplicates import DuplicateSettings
        from .workflows import duplicates_run

        first = resolve_data(cfg)  # --data with the dataset options (default: the synthetic dataset)
        second = None
        if args.against:
            schema = resolve_schema(args.other_schema) if args.other_schema else first.schema
            second = read_dataset(args.against, schema, images=args.other_images or "", drop_missing=True)
        settings = DuplicateSettings(
            neighbours=args.neighbours, patient_neighbours=args.patient_neighbours, top=args.top
        )
        summary = duplicates_run(cfg, first, args.out, second=second, threshold=args.threshold, settings=settings)
    print(f"{summary['pairs']} candidate pairs; {summary['above_threshold']} at or above {summary['threshold']:g}")
    for row in summary["merges"]:
        print("  score >= {:.2f}: ".format(row.pop("threshold")) + ", ".join(f"{v} {k}" for k, v in row.items()))
    print(f"wrote {args.out} (pairs.csv, review.html{', duplicates.csv' if args.against is None else ''})")
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    _config_args(p, dataset_options=False)  # the benchmark reads HAM10000-shaped data
    p.add_argument("--json", type=_path, help="write the figures (with the machine) to this JSON file")
    p.add_argument("--size", action="append", default=[], metavar="KEY=VALUE", help="sample sizes, e.g. train_steps=20")
    p.add_argument("--sections", nargs="+", metavar="NAME", help="data training embeddings ablation explanations")
    p.add_argument("--tiny", action="store_true", help="a tiny synthetic input (seconds): checks the harness runs")


@command("bench", "throughput and memory of each stage against the naive way, measured in one run", _bench_args)
def _bench(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from .data.constants import METADATA_FILE

    _load_cfg(args)  # config mistakes first (the benchmark loads it again with its tiny settings)
    inputs = [p for p in (args.config, args.data and Path(args.data) / METADATA_FILE) if p]
    with output_file(args.json, option="--json", inputs=inputs) if args.json else nullcontext():
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


#: What an empty prediction set means (training/uncertainty.py's EMPTY_SET_MEANING, kept here so --help stays instant).
EMPTY_SET_MEANING = "no class is plausible at this level: refer"


def _print_trust(metrics: Mapping[str, Any], split: str) -> None:
    """Empty prediction sets and, for other data, the shift alarm and the prior's effect, one line each."""
    conformal = metrics.get(split, {}).get("uncertainty", {}).get("conformal", {})
    for level, entry in conformal.items():
        if isinstance(entry, dict) and "n_empty" in entry:
            print(
                f"{split}: {entry['n_empty']} of {entry['n_images']} images ({entry['empty']:.1%}) have an empty "
                f"{float(level):.0%} prediction set ({EMPTY_SET_MEANING})"
            )
    shift = metrics.get("shift")
    if shift:
        test = shift["dataset_test"]
        print(
            f"shift alarm: {shift['n_flagged']} of {shift['n_images']} images ({shift['flag_rate']:.1%}) flagged "
            f"out of distribution at level {shift['level']:g} (the run's own test images: "
            f"{shift['test_flag_rate']:.1%}); "
            f"AUROC against the run's test images {shift['auroc_against_test']:.3f}; dataset test (MMD against the "
            f"validation images) p = {test['p_value']:.3g}"
        )
    for key, what in (("prior", "given prior"), ("estimated_prior", "estimated prior (EM)")):
        effect = metrics.get(key, {}).get("effect") if metrics.get(key) else None
        if effect:
            parts = [
                f"{name} {v['difference']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]" for name, v in effect.items()
            ]
            print(f"{what}: change against the run's probabilities: " + ", ".join(parts))


def _interval(metrics: Mapping[str, Any]) -> str:
    """' [0.676, 0.791]': the balanced accuracy's 95% group-bootstrap interval, '' where none was computed."""
    ci = metrics.get("balanced_accuracy_ci")
    return f" [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]" if ci else ""


def _print_headline(metrics: Mapping[str, Any], splits: tuple[str, ...] = ("val", "test")) -> None:
    shown = [s for s in splits if s in metrics]
    for split in shown:  # the key class is the run's (metrics.json)
        m, b = metrics[split]["calibrated"], metrics[split]["balanced"]
        key = "melanoma" if metrics.get("key_class", "mel") == "mel" else metrics["key_class"]
        print(
            f"{split}: balanced accuracy {m['balanced_accuracy']:.4f}{_interval(m)} ({b['balanced_accuracy']:.4f}"
            f"{_interval(b)} with the balanced decision)  macro AUROC {m['macro_auroc']:.4f}  {key} AUROC "
            f"{m.get('key_auroc', m['melanoma_auroc']):.4f}  ECE {m['ece']:.4f}  ({m['n_images']} images, "
            f"{m['n_lesions']} {metrics.get('groups', 'lesions')})"
        )
    intervals = [metrics[s]["calibrated"].get("balanced_accuracy_ci") for s in shown]
    ci = next((c for c in intervals if c), None)
    if ci:
        unit = f"{ci['grouped_by']}s" if "grouped_by" in ci else metrics.get("groups", "lesions")
        print(f"[ ]: {ci['ci']:.0%} intervals of the balanced accuracies, {ci['n_boot']} draws of whole {unit}")


def build_parser() -> argparse.ArgumentParser:
    """The ``mmlesion`` argument parser with every registered sub-command."""
    parser = _Parser(
        prog="mmlesion",
        description="Skin-lesion classification from a dermoscopic image and patient metadata, "
        "explained jointly (Grad-CAM + SHAP). Start with `mmlesion demo`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=fn, parser=p)
    return parser


class _NotePrinter:
    """Prints each distinct :class:`Note` once as a ``note:`` line on stderr; other warnings as before."""

    def __init__(self, fallback: Callable[..., None]) -> None:
        self.fallback = fallback
        self.seen: set[str] = set()

    def __call__(self, message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if not issubclass(category, Note):
            self.fallback(message, category, *args, **kwargs)
        elif str(message) not in self.seen:
            self.seen.add(str(message))
            print(f"note: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a sub-command; user mistakes become one line on stderr and exit code 2.

    Whatever the command, every note the library emits (rows dropped, values read as unknown, files
    ignored) reaches the user here, once each.
    """
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # named by the sub-command's parser: ``mmlesion train: error: unrecognized arguments: ...``
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decompression bomb.*")  # our own pixel limit reports it
        warnings.simplefilter("always", Note)
        warnings.showwarning = _NotePrinter(warnings.showwarning)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the parsed sub-command; user mistakes become one line on stderr and exit code 2."""
    try:
        return args.func(args)
    except MMLesionError as exc:  # one line, whatever the message holds (a library's multi-line text, say)
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"mmlesion {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmlesion {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mmlesion presets | head`: the reader left; no traceback, no second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
