"""Shared fixtures and helpers of the test suite; test modules reach them as fixtures, never by import.

- data: a tiny HAM10000-shaped folder written for real, and the real data when available;
- the ``mmlesion`` CLI run in subprocesses (``cli``), and one tiny end-to-end run shared by the session;
- the model registry: ``fusion_model`` / ``image_only_model`` / ``metadata_only_model`` arguments run over
  every registered model that reads those inputs, never over a hand-kept list;
- small real models, patient tables and a planted case for the explanation tests;
- a real headless browser: Debian's chromium driven by Playwright (no browser download).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import psutil
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker shares the cores with the others: it and the commands it starts run one math thread,
    # so two torch jobs do not each spin as many OpenMP threads as there are cores (the spin-waits burn CPU).
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

from multimodal_lesion.data.constants import CLASSES, DATA_ENV, MASK_DIR, MASK_SUFFIX, METADATA_FILE

if TYPE_CHECKING:
    import torch
    from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, Playwright, Route

    from multimodal_lesion.models import LesionModel


def write_tiny_ham(root: Path, n_lesions: int = 28, seed: int = 0) -> Path:
    """Write a small HAM10000-layout dataset: real JPEGs, real masks, some multi-image lesions."""
    rng = np.random.default_rng(seed)
    rows = []
    img_no = 24306
    for i in range(n_lesions):
        dx = CLASSES[i % len(CLASSES)]
        n_img = 2 if i % 3 == 0 else 1
        age = float(rng.integers(2, 17) * 5) if i % 9 else np.nan
        sex = ["male", "female", "unknown"][i % 3] if i % 5 else "male"
        loc = ["back", "face", "lower extremity", "unknown", "trunk"][i % 5]
        for _ in range(n_img):
            rows.append(
                dict(
                    lesion_id=f"HAM_{i:07d}",
                    image_id=f"ISIC_{img_no:07d}",
                    dx=dx,
                    dx_type="histo",
                    age=age,
                    sex=sex,
                    localization=loc,
                )
            )
            img_no += 1
    df = pd.DataFrame(rows)
    root.mkdir(parents=True, exist_ok=True)
    df.to_csv(root / METADATA_FILE, index=False)
    (root / "HAM10000_images_part_1").mkdir(exist_ok=True)
    (root / "HAM10000_images_part_2").mkdir(exist_ok=True)
    (root / MASK_DIR).mkdir(exist_ok=True)
    for k, image_id in enumerate(df.image_id):
        part = "HAM10000_images_part_1" if k % 2 == 0 else "HAM10000_images_part_2"
        arr = rng.integers(0, 255, size=(150, 200, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / part / f"{image_id}.jpg", quality=90)
        mask = np.zeros((150, 200), np.uint8)
        mask[50:100, 70:130] = 255
        Image.fromarray(mask).save(root / MASK_DIR / f"{image_id}{MASK_SUFFIX}")
    return root


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for modules of tiny models: on a busy 2-core machine threads mostly wait."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_ham(tmp_path: Path) -> Path:
    """A fresh tiny dataset per test (tests may corrupt it)."""
    return write_tiny_ham(tmp_path / "dataset")


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The real HAM10000 root from MMLESION_HAM10000; skips with a visible reason when unset."""
    value = os.environ.get(DATA_ENV)
    if not value:
        pytest.skip(f"real HAM10000 not available: set {DATA_ENV} to its root")
    root = Path(value)
    if not (root / METADATA_FILE).is_file():
        pytest.fail(f"{DATA_ENV}={value} has no {METADATA_FILE}")
    return root


@pytest.fixture(scope="session")
def tiny_ham_factory() -> Callable[..., Path]:
    """:func:`write_tiny_ham` itself, for fixtures that need a dataset of their own size or scope."""
    return write_tiny_ham


# --- the mmlesion command line, run for real in subprocesses ------------------------------------------

#: ``mmlesion`` as a subprocess of this interpreter.
CLI: tuple[str, ...] = (sys.executable, "-m", "multimodal_lesion.cli")
#: A Python warning as printed on stderr: "FILE:LINE: CategoryWarning: text" + an indented source line.
_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")


class Cli:
    """Runs ``mmlesion`` in subprocesses with a private cache, and checks how a command ended.

    ``cli(*args)`` runs a command to its end; :meth:`start` runs one in the background.
    """

    def __init__(self, cache: Path) -> None:
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMLESION_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}

    def __call__(self, *args: object, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run ``mmlesion ARGS`` and return the finished process (stdout and stderr as text)."""
        return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=self.env, timeout=timeout)

    def start(self, log: Path, *args: object, new_session: bool = False) -> subprocess.Popen:
        """Start ``mmlesion ARGS`` in the background, output to ``log`` (a pipe could fill and block it)."""
        with open(log, "w") as fh:
            return subprocess.Popen(
                [*CLI, *map(str, args)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=new_session,
            )

    @staticmethod
    def wait_for(
        condition: Callable[[], object], proc: subprocess.Popen, log: Path, timeout: float = 300, what: str = ""
    ) -> None:
        """Poll ``condition()`` every 20 ms while ``proc`` runs; fail clearly if it ends or times out first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if proc.poll() is not None:
                pytest.fail(f"process ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
            time.sleep(0.02)

    @staticmethod
    def sigkill(proc: subprocess.Popen) -> None:
        """Kill ``proc`` with SIGKILL (no clean-up of its own) and check that this is how it ended."""
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=300) == -signal.SIGKILL

    @staticmethod
    def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
        """Exit code 0 and no traceback; returns ``proc``."""
        detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
        assert proc.returncode == 0, detail
        assert "Traceback" not in proc.stderr, detail
        return proc

    @classmethod
    def error(cls, proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
        """Exit code 2, no traceback, exactly one stderr line ``mmlesion COMMAND: error: ...`` naming ``needles``."""
        detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
        assert proc.returncode == 2, detail
        assert "Traceback" not in proc.stderr, detail
        lines = cls.own_lines(proc.stderr)
        assert len(lines) == 1, detail
        line = lines[0]
        assert line.startswith(f"mmlesion {command}: error: "), detail
        for needle in needles:
            assert needle in line, f"{needle!r} not in {line!r}"
        return line

    @classmethod
    def notes(cls, proc: subprocess.CompletedProcess) -> list[str]:
        """The ``note: ...`` lines the command printed on stderr."""
        return [line for line in cls.own_lines(proc.stderr) if line.startswith("note: ")]

    @staticmethod
    def own_lines(stderr: str) -> list[str]:
        """stderr without Python warning blocks (library warnings are not the command's own output)."""
        lines, skipping = [], False
        for line in stderr.splitlines():
            if _WARNING.match(line):
                skipping = True
            elif skipping and line.startswith((" ", "\t")):
                continue
            else:
                skipping = False
                if line.strip():
                    lines.append(line)
        return lines


class InProcessCli(Cli):
    """``mmlesion`` called in this process (``multimodal_lesion.cli.main``, what the console script runs), for
    the many commands that end on a user's mistake: no new interpreter importing torch for each (about 4 CPU
    seconds a command). stdout and stderr are captured as text; an exception the command does not turn into
    its error line propagates into the test. :meth:`start` still starts a real process.
    """

    def __init__(self, cache: Path) -> None:
        super().__init__(cache)
        self.overrides = {"HF_HUB_OFFLINE": "1", "MMLESION_CACHE": str(cache)}

    def __call__(self, *args: object, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run ``mmlesion ARGS`` here; the finished "process" with its exit code and output (``timeout`` is
        accepted for the same signature and not enforced: the test's own time limit applies)."""
        import io

        from multimodal_lesion.cli import main

        argv = [str(a) for a in args]
        out, err = io.StringIO(), io.StringIO()
        saved = {key: os.environ.get(key) for key in self.overrides}
        os.environ.update(self.overrides)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as exc:  # argparse's own errors, --help
                    code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        return subprocess.CompletedProcess(["mmlesion", *argv], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def cli_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one private cache of the session's commands."""
    return tmp_path_factory.mktemp("cli-cache")


@pytest.fixture(scope="session")
def cli(cli_cache: Path) -> Cli:
    """``mmlesion`` in subprocesses, with the session's private cache."""
    return Cli(cli_cache)


@pytest.fixture(scope="session")
def cli_here(cli_cache: Path) -> InProcessCli:
    """:class:`InProcessCli` with the same cache: a module of commands that stop on a mistake overrides ``cli``
    with it."""
    return InProcessCli(cli_cache)


def list_temp_files(folder: Path) -> list[str]:
    """Files under a temporary name (``.NAME.*.tmp``, as io.atomic_write / save_checkpoint write them)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name.endswith(".tmp"))


@pytest.fixture(scope="session")
def temp_files() -> Callable[[Path], list[str]]:
    """:func:`list_temp_files`: what a crash or an unfinished write left under a temporary name."""
    return list_temp_files


@pytest.fixture(scope="session")
def cli_ham(tiny_ham_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset shared by the session's CLI runs; tests must not change it."""
    return tiny_ham_factory(tmp_path_factory.mktemp("cli-data") / "dataset")


#: End-to-end fine-tuning of a ~0.4M-parameter timm test network on 48x64 images: each epoch is
#: a few CPU seconds, so a kill lands inside training, and 4 epochs stay quick.
END2END_EPOCHS = 4
END2END_SETTINGS = tuple(
    arg
    for pair in (
        'model.name="concat"',
        'model.backbone="test_resnet"',
        'model.weights="none"',
        "data.image_size=[48, 64]",
        'train.mode="end2end"',
        f"train.epochs={END2END_EPOCHS}",
        "train.batch_size=8",
        "train.patience=100",
        'train.device="cpu"',
        "train.threads=1",
    )
    for arg in ("--set", pair)
)


@dataclass(frozen=True)
class TrainedRun:
    """A finished ``mmlesion train`` run folder and the command that made it (``--out`` aside)."""

    folder: Path
    args: tuple[object, ...]
    epochs: int


@pytest.fixture(scope="session")
def end2end_run(cli: Cli, cli_ham: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """One uninterrupted tiny end-to-end training run, shared by the resume and checkpoint tests."""
    args = ("train", "--data", cli_ham, *END2END_SETTINGS)
    folder = tmp_path_factory.mktemp("end2end") / "run"
    cli.ok(cli(*args, "--out", folder))
    return TrainedRun(folder, args, END2END_EPOCHS)


# --- the model registry: tests are parametrised over it, never over a hand-kept list of names ---------

ModelInputs = frozenset[str]  # what a registered model reads: a subset of {"image", "meta"} (+ "maps")


@functools.cache
def registered_inputs() -> dict[str, ModelInputs]:
    """What each registered model reads ("image", "meta"; "maps" when the metadata conditions the maps)."""
    from multimodal_lesion.models import ImageBranch, create_model, list_models

    branch = ImageBranch("test_resnet", weights="none")  # one tiny backbone shared by the image models
    inputs = {}
    for name in list_models():
        model = create_model(name, meta_dim=1, image_branch=branch)
        used = (("image", model.uses_image), ("meta", model.uses_meta), ("maps", model.fuses_on_maps))
        inputs[name] = ModelInputs(kind for kind, reads in used if reads)
    return inputs


#: Test arguments filled with the registered models that read exactly these inputs.
MODEL_KINDS: dict[str, ModelInputs] = {
    "fusion_model": ModelInputs({"image", "meta"}),  # late fusion (on the pooled embedding)
    "map_fusion_model": ModelInputs({"image", "meta", "maps"}),
    "image_only_model": ModelInputs({"image"}),
    "metadata_only_model": ModelInputs({"meta"}),
}


def models_reading(inputs: ModelInputs) -> list[str]:
    """Registered models that read exactly ``inputs``, sorted."""
    return [name for name, reads in registered_inputs().items() if reads == inputs]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test argument named in :data:`MODEL_KINDS` runs once per registered model of that kind."""
    for argname, inputs in MODEL_KINDS.items():
        if argname in metafunc.fixturenames:
            metafunc.parametrize(argname, models_reading(inputs))


#: The longest test modules (minutes each on 2 cores), handed to the two xdist workers first so that
#: neither worker is left with a long module at the end while the other idles (longest-first scheduling).
LONGEST_MODULES = (
    "test_notebooks.py",
    "test_pipeline_synthetic.py",
    "test_map_fusion.py",
    "test_bad_input_runs.py",
    "test_bad_input_data.py",
    "test_external.py",
    "test_ablation_backends.py",
    "test_getting_started.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run :data:`LONGEST_MODULES` first, in that order; every other module keeps its place after them."""
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def model_inputs() -> dict[str, ModelInputs]:
    """Registered model name -> what it reads (a subset of {"image", "meta"})."""
    return registered_inputs()


# --- small real models and patient tables for the explanation tests ----------------------------------

#: Meta width of :func:`make_small_model` models unless told otherwise.
SMALL_META_DIM = 6


def make_small_model(
    name: str = "gated", seed: int = 0, meta_dim: int = SMALL_META_DIM, num_classes: int = 7
) -> LesionModel:
    """A registered model on a random-weight resnet18 with small heads."""
    import torch

    from multimodal_lesion.config import ModelConfig
    from multimodal_lesion.models import create_model

    cfg = ModelConfig(backbone="resnet18", weights="none", head_hidden=32, meta_hidden=8, dropout=0.0)
    torch.manual_seed(seed)
    return create_model(name, meta_dim=meta_dim, num_classes=num_classes, cfg=cfg)


PATIENT_SEXES = ["male", "female", "unknown"]
PATIENT_SITES = ["back", "face", "trunk", "lower extremity", "unknown"]


def make_patients(n: int, seed: int) -> pd.DataFrame:
    """``n`` random patients (age, sex, localization); about one age in ten is missing."""
    rng = np.random.default_rng(seed)
    age = rng.integers(1, 18, n) * 5.0
    age[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame({"age": age, "sex": rng.choice(PATIENT_SEXES, n), "localization": rng.choice(PATIENT_SITES, n)})


def make_confident(model: LesionModel) -> LesionModel:
    """Linear weights outside the backbone (head, metadata branch, a map model's fusion) 3x the default init,
    so the metadata moves the probabilities by ~0.1."""
    import torch

    parts = [child for child in model.children() if child is not model.image_branch]
    with torch.no_grad():
        for module in [m for part in parts for m in part.modules()]:
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(3)
    return model


@pytest.fixture(scope="session")
def small_model() -> Callable[..., LesionModel]:
    """:func:`make_small_model`: ``small_model(name, seed=0, meta_dim=6, num_classes=7)``."""
    return make_small_model


@pytest.fixture(scope="session")
def patients() -> Callable[[int, int], pd.DataFrame]:
    """:func:`make_patients`: ``patients(n, seed)``."""
    return make_patients


@pytest.fixture(scope="session")
def confident() -> Callable[[LesionModel], LesionModel]:
    """:func:`make_confident`: scales a model's head weights in place and returns it."""
    return make_confident


# --- a planted case: the class is decided by a bright square in a fixed corner -----------------------

PLANTED_SIZE = (64, 64)
PLANTED_SQUARE = (slice(4, 24), slice(4, 24))


@dataclass
class Planted:
    """A model trained on a task whose evidence is known, and held-out cases of the positive class."""

    model: LesionModel  # concat, frozen random resnet18, head trained on the planted task
    images: torch.Tensor  # (4, 3, 64, 64) held-out images of class 1 (square present)
    meta: torch.Tensor  # (4, 2) zeros
    mask: np.ndarray  # (64, 64) the square
    size: tuple[int, int] = PLANTED_SIZE  # (height, width) of the images


def planted_images(n: int, label: int, g: torch.Generator) -> torch.Tensor:
    """Noise of random strength; class 1 adds a bright square in the top-left corner."""
    import torch

    amp = torch.rand(n, 1, 1, 1, generator=g) * 0.6
    x = torch.randn(n, 3, *PLANTED_SIZE, generator=g) * amp
    if label:
        x[:, :, PLANTED_SQUARE[0], PLANTED_SQUARE[1]] += 2.5
    return x


def build_planted(n: int = 32, steps: int = 100) -> Planted:
    """Train the head of a frozen random resnet18 (the frozen path) to tell squares from noise."""
    import torch

    model = make_small_model("concat", meta_dim=2, num_classes=2)
    model.image_branch.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([planted_images(n, 0, g), planted_images(n, 1, g)])
    y = torch.arange(2).repeat_interleave(n)
    meta = torch.zeros(2 * n, 2)
    with torch.no_grad():
        emb = model.eval().image_branch.embed(x)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model.forward_head(emb, meta), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(True)
    mask = np.zeros(PLANTED_SIZE, dtype=bool)
    mask[PLANTED_SQUARE] = True
    return Planted(model, planted_images(4, 1, g), torch.zeros(4, 2), mask)


@pytest.fixture(scope="session")
def planted() -> Planted:
    """One planted case for the session (Grad-CAM and faithfulness tests read it, never change it)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a busy machine, as ``single_thread``
    try:
        return build_planted()
    finally:
        torch.set_num_threads(threads)


# --- a real browser: Debian's chromium, driven by Playwright (never a downloaded browser) -------------

#: Flags for a quiet headless browser that reaches no network on its own.
CHROMIUM_ARGS: tuple[str, ...] = (
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
#: Every browser wait (start-up, navigation, evaluation) ends within this many milliseconds.
BROWSER_TIMEOUT_MS = 20_000
#: Viewport of the test pages, in CSS pixels.
VIEWPORT = {"width": 1280, "height": 900}


def _descendants(before: Collection[int] = ()) -> list[psutil.Process]:
    """Processes below this one, except the pids in ``before``."""
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]


def _with_children(processes: list[psutil.Process]) -> list[psutil.Process]:
    """``processes`` and everything they have started since (a browser's renderers, say)."""
    found = {p.pid: p for p in processes}
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update({child.pid: child for child in proc.children(recursive=True)})
    return list(found.values())


def _end_processes(processes: list[psutil.Process], grace: float = 10.0) -> None:
    """Wait for ``processes`` to exit, then kill whatever is left of them."""
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)


def _chromium_executable() -> str:
    """Debian's ``chromium`` on PATH; skips the test with the reason when it is not installed."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("Debian's chromium is not on PATH (apt-get install chromium)")
    return executable


@contextlib.contextmanager
def playwright_driver() -> Iterator[Playwright]:
    """Playwright's synchronous API; on exit its driver process has ended. Skips without chromium or Playwright."""
    _chromium_executable()
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')"
    )
    before = {p.pid for p in _descendants()}
    try:
        with sync_api.sync_playwright() as playwright:
            yield playwright
    finally:
        _end_processes(_descendants(before))


@contextlib.contextmanager
def headless_chromium(playwright: Playwright) -> Iterator[Browser]:
    """Debian's ``chromium``, headless, launched by ``playwright`` (no browser is ever downloaded).

    On exit the browser is closed and every process it started (the browser, its helpers and
    renderers) has ended, also when the body raised.
    """
    before = {p.pid for p in _descendants()}
    browser = playwright.chromium.launch(
        executable_path=_chromium_executable(), headless=True, args=list(CHROMIUM_ARGS), timeout=BROWSER_TIMEOUT_MS
    )
    started = _descendants(before)
    try:
        yield browser
    finally:
        started = _with_children(started)
        try:
            browser.close()
        finally:
            _end_processes(started)


class WatchedPage:
    """A Playwright page that records what a clean page must not do.

    ``errors`` gets console errors, uncaught exceptions and failed loads; ``requests`` every URL the
    page asked for (anything but ``file:`` and ``data:`` is aborted before it leaves the browser, as
    ``net::ERR_BLOCKED_BY_CLIENT``); ``dialogs`` the message of every alert / confirm / prompt
    (dismissed). :meth:`open` starts the records afresh.
    """

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"exception: {exc}"))
        page.on("requestfailed", lambda req: self.errors.append(f"failed: {req.url} {req.failure}"))
        page.on("request", lambda req: self.requests.append(req.url))
        page.on("dialog", self._on_dialog)

    def open(self, target: str | Path) -> None:
        """Navigate to a file path or URL, wait for its load event, then let pending timers run."""
        url = target if isinstance(target, str) and "://" in target else Path(target).resolve().as_uri()
        for record in (self.errors, self.requests, self.dialogs):
            record.clear()
        self.page.goto(url, wait_until="load")
        self.page.evaluate("() => new Promise(resolve => setTimeout(resolve, 50))")

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "assert"):
            self.errors.append(f"console: {message.text}")

    def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


def _is_remote(url: str) -> bool:
    return not url.startswith(("file:", "data:"))


def _block(route: Route) -> None:
    route.abort("blockedbyclient")


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """Playwright's driver for a module's browser tests (one per thread: the sync API cannot nest)."""
    with playwright_driver() as driver:
        yield driver


@pytest.fixture(scope="module")
def chromium(playwright: Playwright) -> Iterator[Browser]:
    """One headless chromium for a module's browser tests; always ended with the module."""
    with headless_chromium(playwright) as browser:
        yield browser


@pytest.fixture
def chromium_page(chromium: Browser) -> Iterator[WatchedPage]:
    """A fresh page (its own context: no shared storage) with 1280x900 CSS pixels, no network."""
    context = chromium.new_context(viewport=VIEWPORT, device_scale_factor=1, service_workers="block")
    context.set_default_timeout(BROWSER_TIMEOUT_MS)
    context.route(_is_remote, _block)
    try:
        yield WatchedPage(context.new_page())
    finally:
        context.close()


@pytest.fixture
def launch_chromium(playwright: Playwright) -> Callable[[], contextlib.AbstractContextManager[Browser]]:
    """Start another browser as :func:`headless_chromium` does, for tests of the browser's life cycle."""
    return functools.partial(headless_chromium, playwright)


# --- tiny datasets in each schema preset's own file format ------------------------------------------------


def _jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int] = (60, 80)) -> None:
    """A small real image (random pixels) at ``path`` (JPEG or PNG by its extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)).save(path)


def write_tiny_isic2019(root: Path, images: Path, n_lesions: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """ISIC 2019's two CSVs (one-hot ground truth + metadata, CRLF as published) in ``root``; the images of
    the HAM-like part in ``images`` (apart from the CSVs); the BCN-like rows (no lesion id) have no image.

    Returns (root, images): 8 classes, ``n_lesions`` lesions with images (some of two images), and as
    many listed images that are not there.
    """
    rng = np.random.default_rng(seed)
    classes = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
    truth, meta, number = [], [], 24306
    for i in range(n_lesions):
        for _ in range(2 if i % 4 == 0 else 1):
            image = f"ISIC_{number:07d}"
            number += 1
            _jpeg(images / ("part_1" if i % 2 else "part_2") / f"{image}.jpg", rng)
            truth.append({"image": image, **{c: float(c == classes[i % 8]) for c in (*classes, "UNK")}})
            age = "" if i % 7 == 3 else str(int(rng.integers(2, 17)) * 5)
            site = ["anterior torso", "head/neck", "", "lower extremity"][i % 4]
            lesion = "" if i == n_lesions - 1 else f"HAM_{i:07d}"  # one downloaded image without a lesion id
            meta.append({"image": image, "age_approx": age, "anatom_site_general": site, "lesion_id": lesion})
            meta[-1]["sex"] = ["male", "female", ""][i % 3]
    for j in range(n_lesions):  # listed, never downloaded (BCN20000 / MSK-like rows, some without lesion id)
        image = f"ISIC_{j:07d}" + ("_downsampled" if j % 5 == 0 else "")
        truth.append({"image": image, **{c: float(c == classes[j % 8]) for c in (*classes, "UNK")}})
        meta.append({"image": image, "age_approx": "50", "anatom_site_general": "anterior torso", "sex": "male"})
        meta[-1]["lesion_id"] = "" if j % 2 else f"BCN_{j:07d}"
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(truth).to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False, lineterminator="\r\n")
    columns = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
    pd.DataFrame(meta)[columns].to_csv(root / "ISIC_2019_Training_Metadata.csv", index=False, lineterminator="\r\n")
    return root, images


def write_tiny_isic2020(root: Path, n_patients: int = 24, seed: int = 0) -> Path:
    """ISIC 2020's table, its duplicates file and an ``images/`` folder holding part of the listed images.

    Every patient has 3 or 4 images; every third patient has one melanoma among them. The duplicates file pairs
    two images of different patients (kept in one group), and one pair names an image not downloaded.
    """
    rng = np.random.default_rng(seed)
    rows, number = [], 10000
    for p in range(n_patients):
        for k in range(3 + p % 2):  # one melanoma among 3 or 4 images: a minority of its patient's images
            mel = p % 3 == 0 and k == 0
            rows.append(
                {
                    "image_name": f"ISIC_{number:07d}",
                    "patient_id": f"IP_{p:07d}",
                    "sex": ["female", "male", ""][p % 3] if p % 7 else "male",
                    "age_approx": "" if p % 11 == 5 else f"{int(rng.integers(4, 17)) * 5}.0",
                    "anatom_site_general_challenge": ["torso", "lower extremity", "head/neck", ""][k % 4],
                    "diagnosis": "melanoma" if mel else "unknown",
                    "benign_malignant": "malignant" if mel else "benign",
                    "target": int(mel),
                }
            )
            number += 1
    table = pd.DataFrame(rows)
    for i, image in enumerate(table["image_name"]):
        if i % 9 != 8:  # a partial download: every ninth image is missing
            _jpeg(root / "images" / f"{image}.jpg", rng, (64, 64))
    table.to_csv(root / "ISIC_2020_Training_GroundTruth.csv", index=False)
    pairs = [(table.image_name[0], table.image_name[3]), (table.image_name[5], table.image_name[8])]
    pd.DataFrame(pairs, columns=["image_name_1", "image_name_2"]).to_csv(
        root / "ISIC_2020_Training_Duplicates.csv", index=False
    )
    return root


PAD_BOOLEANS = (
    "smoke",
    "drink",
    "pesticide",
    "skin_cancer_history",
    "cancer_history",
    "has_piped_water",
    "has_sewage_system",
)
PAD_SYMPTOMS = ("itch", "grew", "hurt", "changed", "bleed", "elevation")


def write_tiny_pad_ufes_20(root: Path, n_patients: int = 36, seed: int = 0, images: bool = False) -> Path:
    """PAD-UFES-20's ``metadata.csv`` (26 columns, ``UNK`` symptoms, empty history cells, ``biopsed``).

    Lesion ids repeat across patients (as in the release); with ``images``, PNGs in ``images/``.
    """
    rng = np.random.default_rng(seed)
    classes = ("BCC", "ACK", "NEV", "SEK", "SCC", "MEL")
    rows, img = [], 100
    for p in range(n_patients):
        for k in range(1 + p % 2):
            dx = classes[(p + k) % 6]
            known = p % 3 != 0  # a third of the patients answered no questionnaire (empty cells)
            row = {"patient_id": f"PAT_{p}", "lesion_id": str(k + p % 5)}
            row.update({b: str(bool(rng.integers(2))) if known else "" for b in PAD_BOOLEANS[:2]})
            row.update(background_father="POMERANIA" if known else "", background_mother="ITALY" if known else "")
            row.update(age=str(int(rng.integers(20, 90))), pesticide=str(bool(rng.integers(2))) if known else "")
            row.update(gender=["FEMALE", "MALE"][p % 2] if known else "")
            row.update({b: str(bool(rng.integers(2))) if known else "" for b in PAD_BOOLEANS[3:]})
            row.update(fitspatrick=f"{int(rng.integers(1, 7))}.0" if known else "")
            row.update(region=["ARM", "FACE", "NECK", "BACK", "CHEST"][p % 5])
            row.update(diameter_1=f"{rng.integers(2, 20)}.0" if known else "", diameter_2="")
            row.update(diagnostic=dx)
            row.update({s: ["True", "False", "UNK"][(p + i) % 3] for i, s in enumerate(PAD_SYMPTOMS)})
            row.update(img_id=f"PAT_{p}_{row['lesion_id']}_{img}.png", biopsed=str(dx in ("BCC", "MEL", "SCC")))
            rows.append(row)
            img += 1
            if images:
                _jpeg(root / "images" / row["img_id"], rng)
    columns = [
        "patient_id", "lesion_id", "smoke", "drink", "background_father", "background_mother", "age", "pesticide",
        "gender", "skin_cancer_history", "cancer_history", "has_piped_water", "has_sewage_system", "fitspatrick",
        "region", "diameter_1", "diameter_2", "diagnostic", "itch", "grew", "hurt", "changed", "bleed", "elevation",
        "img_id", "biopsed",
    ]  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows)[columns].to_csv(root / "metadata.csv", index=False)
    return root


#: A user's own schema (not a preset): three classes, patient groups, features sex, location, elevation, no masks.
CLINIC_SCHEMA = """[dataset]
name = "clinic"
metadata = "cases.csv"
image_column = "image"
label_column = "diagnosis"
classes = ["naevus", "melanoma", "keratosis"]
key_class = "melanoma"
patient_column = "patient"
group_by = "patient"
[features]
categorical = ["sex", "location"]
boolean = ["elevation"]
"""


def write_tiny_clinic(root: Path, n_patients: int = 24, seed: int = 0) -> Path:
    """A clinic's own data for :data:`CLINIC_SCHEMA` (``schema.toml`` beside ``cases.csv``): two PNGs per
    patient, tinted by class so that a tiny model learns something."""
    rng = np.random.default_rng(seed)
    classes, tints = ("naevus", "melanoma", "keratosis"), ((150, 90, 60), (60, 40, 40), (170, 150, 110))
    rows = []
    (root / "photos").mkdir(parents=True, exist_ok=True)
    for p in range(n_patients):
        for k in range(2):
            name = f"case{p:03d}_{k}"
            noise = rng.integers(-40, 40, size=(48, 64, 3))
            pixels = np.clip(np.asarray(tints[p % 3]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "photos" / f"{name}.png")
            sex, location = ["female", "male", ""][p % 3], ["arm", "back", "face", "leg"][(p + k) % 4]
            rows.append(dict(image=name, diagnosis=classes[p % 3], patient=f"P{p}", sex=sex, location=location,
                             elevation=["yes", "no", ""][(p + k) % 3]))  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "cases.csv", index=False)
    (root / "schema.toml").write_text(CLINIC_SCHEMA)
    return root


@pytest.fixture
def tiny_isic2019(tmp_path: Path) -> tuple[Path, Path]:
    """(CSV root, image root) of a tiny ISIC 2019 whose images live apart from its CSVs."""
    return write_tiny_isic2019(tmp_path / "isic2019", tmp_path / "isic_images")


@pytest.fixture
def tiny_isic2020(tmp_path: Path) -> Path:
    return write_tiny_isic2020(tmp_path / "isic2020")


@pytest.fixture
def tiny_pad(tmp_path: Path) -> Path:
    return write_tiny_pad_ufes_20(tmp_path / "pad")


@pytest.fixture(scope="session")
def tiny_run_settings() -> list[str]:
    """``--set`` overrides of a real but tiny CPU run (test backbone, 48x64, 2 epochs, one thread)."""
    return [
        'model.name="concat"',
        'model.backbone="test_resnet"',
        'model.weights="none"',
        "data.image_size=[48, 64]",
        "train.epochs=2",
        "train.batch_size=16",
        "train.warmup_epochs=1",
        "data.test_size=0.25",
        "data.val_size=0.25",
        'train.device="cpu"',
        "train.threads=1",
    ]
