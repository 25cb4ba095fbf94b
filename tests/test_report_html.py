"""HTML report: real PNG files, real pages on disk, opened in a real headless Chromium (no mocks).

The browser is Debian's ``chromium`` driven by Playwright (the ``chromium`` / ``chromium_page``
fixtures in conftest.py): every image must load, the console stay quiet, nothing but ``file:`` /
``data:`` be requested, and hostile metadata stay inert text.
"""

from __future__ import annotations

import base64
import contextlib
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import markupsafe
import numpy as np
import psutil
import pytest
from PIL import Image, ImageDraw

from multimodal_lesion.data.constants import CLASS_NAMES, CLASSES
from multimodal_lesion.errors import DataError
from multimodal_lesion.explain.faithfulness import PairedComparison
from multimodal_lesion.explain.randomisation import MapSimilarity, StageResult
from multimodal_lesion.explain.results import CaseExplanation, CohortExplanation, FaithfulnessRow
from multimodal_lesion.report.html import ReportFigures, case_page_name, write_report

#: Markup a hostile metadata CSV could carry; each must reach the page as text, never as markup.
PAYLOADS = (
    "<script>window.__pwned=1</script>",
    '"><img src=x onerror="window.__pwned=2">',
    "'><svg onload=window.__pwned=3>",
    "</title></style><script>window.__pwned=4</script>",
    '<a href="javascript:window.__pwned=5">x</a>',
    "{{ 7 * 7 }} {% raw %}",
)
HOSTILE_IDS = (PAYLOADS[0], PAYLOADS[1], "../../../etc/passwd", "a/b\\c ..")
CASE_FIGURES = ("image", "overlay", "waterfall", "modality")
COHORT_FIGURES = ("beeswarm", "shap_bar", "modality_by_class")


# ----------------------------------------------------------------------------- real inputs


def _lesion_png(path: Path, seed: int, size: tuple[int, int] = (300, 225)) -> Path:
    """A small dermoscopy-like PNG: skin-coloured background, a dark blob."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(170, 235, 3)))
    draw = ImageDraw.Draw(img)
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
    draw.ellipse([cx - w / 5, cy - h / 5, cx + w / 5, cy + h / 5], fill=tuple(int(v) for v in rng.integers(40, 110, 3)))
    img.save(path)
    return path


def _bar_png(path: Path, values: dict[str, float]) -> Path:
    """A real matplotlib bar chart (Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 2.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(list(values), list(values.values()), color="#4c72b0")
    ax.set_xlabel("mean |SHAP|")
    fig.tight_layout()
    fig.savefig(path)
    return path


@pytest.fixture(scope="module")
def figure_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real PNG files for the cohort figures and for up to four cases."""
    root = tmp_path_factory.mktemp("figures")
    _bar_png(root / "shap_bar.png", {"age": 0.03, "sex": 0.02, "localization": 0.12})
    for j, name in enumerate(("beeswarm", "modality_by_class")):
        _lesion_png(root / f"{name}.png", 100 + j, (500, 260))
    for k in range(4):
        for j, name in enumerate(CASE_FIGURES):
            _lesion_png(root / f"case{k}_{name}.png", 10 * k + j, (300, 225) if j < 2 else (480, 260))
    return root


def make_cohort(text: str = "", cases: list[CaseExplanation] | None = None) -> CohortExplanation:
    """A valid cohort; ``text`` is appended to every free-text field (hostile tests)."""
    return CohortExplanation(
        title=f"Explanations: concat / resnet18 {text}",
        provenance={
            "model": f"concat{text}",
            "backbone": "resnet18",
            "weights": "none",
            "run folder": "/runs/a",
            "data fingerprint": "0123abcd",
            "split": "test",
            "n cases": "3",
            "versions": {"torch": "2.4.0", "shap": "0.46.0"},
            f"key{text}": f"value{text}",
        },  # type: ignore[dict-item]
        cases=cases or [],
        mean_abs_shap={
            **{c: {"age": 0.01 * i, "sex": 0.02, "localization": 0.04 * i} for i, c in enumerate(CLASSES)},
            "all": {"age": 0.031, "sex": 0.02, "localization": 0.123},
        },
        modality_share={
            **{c: {"image": 0.6, "age": 0.1, "sex": 0.05, "localization": 0.25} for c in CLASSES},
            "all": {"image": 0.55, "age": 0.15, "sex": 0.05, "localization": 0.25},
        },
        faithfulness=[
            FaithfulnessRow(
                "deletion AUC (lower is better)", 0.212, {"smooth_random": 0.341, "centre": 0.254}, f"n=3{text}"
            ),
            FaithfulnessRow("pointing game", 0.8, {"smooth_random": None, "centre": 0.6}, "cases with a mask"),
        ],
        comparisons=[
            PairedComparison("energy_inside", "centre", 12, 0.79, 0.70, 0.09, 0.04, 0.14, "better"),
            PairedComparison("deletion_auc", "mean_mask", 12, 0.31, 0.25, -0.06, -0.1, -0.02, "worse"),
        ],
        randomisation=[
            StageResult("head", [MapSimilarity(0.2, 0.3, True), MapSimilarity(0.1, 0.2, True)]),
            StageResult("conv_stem", [MapSimilarity(float("nan"), float("nan"), False, "constant map")] * 2),
        ],
        class_counts={c: 1 for c in CLASSES} | {"all": 7},
        notes=["Background: 100 training cases.", f"note{text}"],
    )


def make_case(k: int, image_id: str, text: str = "") -> CaseExplanation:
    """A valid case; ``text`` goes into sex, localization and the true label."""
    probs = np.random.default_rng(k).dirichlet(np.ones(len(CLASSES)))
    predicted = CLASSES[int(probs.argmax())]
    shap = {"age": 0.02, "sex": -0.01, "localization": 0.11 + 0.01 * k}
    return CaseExplanation(
        image_id=image_id,
        true_label=(f"mel{text}" if text else CLASSES[k % 7]) if k != 1 else None,
        target_class=predicted,
        probabilities=dict(zip(CLASSES, probs.tolist(), strict=True)),
        patient={"age": "45", "sex": f"male{text}", "localization": f"back{text}"},
        shap=shap,
        shap_base_value=0.3,
        model_output=0.3 + sum(shap.values()),
        modality={"image": 0.2, **shap},
        faithfulness={"deletion_auc": 0.2, "insertion_auc": 0.61, "pointing_game": True},
        shap_error={"age": 0.004, "sex": 0.0004, "localization": 0.01},
        explained_probability=float(probs.max()),
        selection=["correct", "error", "least confident"][k % 3],
    )


def make_figures(figs: Path, cases: list[CaseExplanation]) -> ReportFigures:
    """The real PNG files of the cohort and of each case (case k gets the k-th set)."""
    return ReportFigures(
        cohort={name: figs / f"{name}.png" for name in COHORT_FIGURES},
        cases={c.image_id: {name: figs / f"case{k}_{name}.png" for name in CASE_FIGURES} for k, c in enumerate(cases)},
    )


def render(out: Path, figs: Path, cases: list[CaseExplanation], text: str = "") -> Path:
    """Write the report of ``cases`` with a valid cohort and real figures."""
    return write_report(out, make_cohort(text, cases), make_figures(figs, cases))


def _hostile_text() -> str:
    return " " + " ".join(PAYLOADS)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, figure_dir: Path) -> tuple[Path, list[CaseExplanation]]:
    """A three-case report written for real; returns (index path, cases)."""
    cases = [make_case(k, f"ISIC_{24306 + k:07d}") for k in range(3)]
    return render(tmp_path_factory.mktemp("report"), figure_dir, cases), cases


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory: pytest.TempPathFactory, figure_dir: Path) -> tuple[Path, list[CaseExplanation]]:
    """A report whose ids, labels, patient values, provenance and notes carry markup."""
    cases = [make_case(k, iid, _hostile_text()) for k, iid in enumerate(HOSTILE_IDS)]
    return render(tmp_path_factory.mktemp("hostile"), figure_dir, cases, _hostile_text()), cases


# ----------------------------------------------------------------------------- HTML parsing


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> _Tags:
    parser = _Tags()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _pages(index: Path) -> list[Path]:
    return [index, *sorted((index.parent / "cases").glob("*.html"))]


def _local_links(page: Path) -> list[Path]:
    """Targets of the page's relative links (fragments dropped)."""
    hrefs = [a.get("href") or "" for tag, a in parse(page).tags if tag == "a"]
    return [page.parent / unquote(h.split("#")[0]) for h in hrefs if h.split("#")[0]]


# ----------------------------------------------------------------------------- files and source


def test_report_writes_index_and_one_page_per_case_with_working_links(report):
    index, cases = report
    pages = sorted((index.parent / "cases").glob("*.html"))
    assert index.is_file() and len(pages) == len(cases)
    assert {p.name for p in pages} == {case_page_name(c.image_id) for c in cases}
    index_links = _local_links(index)
    assert {p.resolve() for p in pages} <= {p.resolve() for p in index_links}
    for page in _pages(index):
        assert all(link.is_file() for link in _local_links(page)), page
    assert index.resolve() in {p.resolve() for p in _local_links(pages[0])}  # back link
    assert not list(index.parent.rglob("*.tmp")) and oct(index.stat().st_mode & 0o777) == "0o644"


def test_report_is_self_contained(report, figure_dir):
    index, _ = report
    originals = {p.read_bytes() for p in figure_dir.glob("*.png")}
    for page in _pages(index):
        source = page.read_text(encoding="utf-8")
        tags = parse(page).tags
        assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed", "base")], page
        for tag, attrs in tags:
            for name, value in attrs.items():
                assert not re.match(r"\s*(https?:|//|ftp:)", value or "", re.I), (page, tag, name, value)
        srcs = [a["src"] for t, a in tags if t == "img"]
        assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
        assert {base64.b64decode(s.split(",", 1)[1]) for s in srcs} <= originals
        assert "url(" not in source and "@import" not in source and "http://" not in source


def test_report_shows_full_class_names_tables_and_provenance(report):
    index, cases = report
    text = " ".join(parse(index).text)
    for needle in (
        CLASS_NAMES["mel"],
        CLASS_NAMES["nv"],
        "All cases",
        "deletion AUC (lower is better)",
        "0.341",
        "0123abcd",
        "torch: 2.4.0; shap: 0.46.0",
        "localization (+0.110)",
        "59%",
        cases[0].image_id,
    ):
        assert needle in text, needle
    case_text = " ".join(parse(index.parent / "cases" / case_page_name(cases[0].image_id)).text)
    probs = cases[0].probabilities
    predicted = max(probs, key=probs.__getitem__)
    for needle in (
        CLASS_NAMES[predicted],
        f"{probs[predicted]:.3f}",
        "Base + sum of SHAP",
        "0.420",
        "back",
        "pointing_game",
        "yes",
    ):
        assert needle in case_text, needle
    widths = [
        a["style"]
        for t, a in parse(index.parent / "cases" / case_page_name(cases[0].image_id)).tags
        if t == "span" and "width" in (a.get("style") or "")
    ]
    assert len(widths) >= len(CLASSES)


@pytest.mark.parametrize(
    "image_id",
    [
        "ISIC_0024306",
        "../../etc/passwd",
        "a/b\\c",
        "<script>x</script>",
        "",
        ".hidden",
        "-rf",
        "CON",
        "é" * 80,
        "x" * 500,
        "a\x00b",
    ],
)
def test_case_page_names_are_safe_for_hostile_ids(image_id):
    name = case_page_name(image_id)
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,39}-[0-9a-f]{10}\.html", name), name
    assert name == case_page_name(image_id)
    assert case_page_name(image_id + "!") != name


def test_hostile_strings_are_escaped_in_source(hostile_report):
    index, _ = hostile_report
    pages = _pages(index)
    assert len(pages) == 1 + len(HOSTILE_IDS)
    assert all(
        p.resolve().parent in (index.parent.resolve(), (index.parent / "cases").resolve())
        for p in index.parent.rglob("*")
        if p.is_file()
    )
    for page in pages:
        source = page.read_text(encoding="utf-8")
        parsed = parse(page)
        for payload in PAYLOADS[:5]:
            assert payload not in source, (page.name, payload)
        assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in source
        assert not [t for t, _ in parsed.tags if t in ("script", "svg", "iframe", "object", "embed")], page.name
        assert not [(t, n) for t, a in parsed.tags for n in a if n.startswith("on")], page.name
        assert not [a for t, a in parsed.tags if t == "a" and "javascript:" in (a.get("href") or "").lower()]
        imgs = [a for t, a in parsed.tags if t == "img"]
        assert len(imgs) == (len(COHORT_FIGURES) if page == index else len(CASE_FIGURES))
        assert all(a["src"].startswith("data:image/png;base64,") for a in imgs)
        text = "".join(parsed.text)
        assert PAYLOADS[0] in text and PAYLOADS[5] in text  # shown to the reader as text, not evaluated


def test_markup_objects_from_data_are_still_escaped(tmp_path, figure_dir):
    class Sneaky:
        def __html__(self) -> str:
            return "<script>window.__pwned=6</script>"

        def __str__(self) -> str:
            return "<b>sneaky</b>"

    case = make_case(0, markupsafe.Markup("<script>window.__pwned=7</script>"))
    case.patient["localization"] = markupsafe.Markup("<img src=x onerror=alert(1)>")
    cohort = make_cohort(cases=[case])
    cohort.provenance["sneaky"] = Sneaky()  # type: ignore[assignment]
    index = write_report(tmp_path, cohort, make_figures(figure_dir, [case]))
    for page in _pages(index):
        source = page.read_text(encoding="utf-8")
        assert "<script>window" not in source and "<img src=x" not in source and "<b>sneaky" not in source
        assert "&lt;img src=x onerror=alert(1)&gt;" in source or page == index
    assert "&lt;b&gt;sneaky&lt;/b&gt;" in index.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda cohort, figs: figs.cases["ISIC_0"].update(image=Path("/nonexistent/img.png")), "nonexistent/img.png"),
        (lambda cohort, figs: figs.cohort.update(beeswarm=Path(__file__)), "is not a PNG or JPEG"),
        (lambda cohort, figs: setattr(cohort.cases[1], "image_id", "ISIC_0"), "duplicate image_id"),
        (
            lambda cohort, figs: cohort.cases.__setitem__(1, {"image_id": "ISIC_1"}),
            "case 1: expected a CaseExplanation, got dict",
        ),
        (lambda cohort, figs: cohort.cases[0].probabilities.update(mel="high"), "probabilities['mel']"),
        (lambda cohort, figs: cohort.mean_abs_shap["all"].update(age="x"), "mean_abs_shap['all']['age']"),
        (lambda cohort, figs: cohort.faithfulness.append({"metric": "x"}), "faithfulness[2] must be a FaithfulnessRow"),
    ],
)
def test_bad_report_input_fails_with_a_clear_error(tmp_path, figure_dir, breakage, message):
    cases = [make_case(k, f"ISIC_{k}") for k in range(2)]
    cohort, figures = make_cohort(cases=cases), make_figures(figure_dir, cases)
    breakage(cohort, figures)
    with pytest.raises(DataError, match=re.escape(message)):
        write_report(tmp_path / "out", cohort, figures)
    assert not (tmp_path / "out" / "index.html").exists()


def test_optional_parts_may_be_absent(tmp_path, figure_dir):
    """An image-only model has no SHAP and no patient data; a metadata-only one has no Grad-CAM."""
    image_only = CaseExplanation(image_id="ISIC_1", target_class="nv", probabilities={"nv": 0.7, "mel": 0.3})
    figures = ReportFigures(cases={"ISIC_1": {"image": figure_dir / "case0_image.png", "overlay": None}})
    index = write_report(tmp_path, CohortExplanation("Minimal", {}, [image_only]), figures)
    case_text = " ".join(parse(tmp_path / "cases" / case_page_name("ISIC_1")).text)
    assert "No SHAP values" in case_text and "No modality attribution" in case_text
    assert "No faithfulness measurements" in " ".join(parse(index).text)


def test_a_non_ham_run_lists_its_own_classes_in_logit_order_with_its_names(tmp_path):
    """A binary ISIC 2020 run: 'rest' before 'mel' (its logit order, not HAM10000's) with the schema's names."""
    names = {"rest": "Other (not melanoma)", "mel": "Melanoma (mel)"}
    case = CaseExplanation(image_id="ISIC_2", target_class="mel", probabilities={"mel": 0.3, "rest": 0.7})
    cohort = CohortExplanation(
        "Binary",
        {},
        [case],
        mean_abs_shap={"mel": {"age": 0.1}, "all": {"age": 0.1}, "rest": {"age": 0.2}},
        classes=["rest", "mel"],
        class_names=names,
    )
    index = write_report(tmp_path, cohort, ReportFigures())
    case_text = " ".join(parse(tmp_path / "cases" / case_page_name("ISIC_2")).text)
    assert case_text.index(names["rest"]) < case_text.index(names["mel"])
    index_text = " ".join(parse(index).text)
    rows = [index_text.index(label) for label in (names["rest"], names["mel"], "All cases")]
    assert rows == sorted(rows)


# ----------------------------------------------------------------------------- real browser

#: Every <img> with whether it loaded (``complete`` and ``naturalWidth > 0``).
IMAGES_JS = """Array.from(document.images).map(i => ({
  src: (i.currentSrc || i.src || '').slice(0, 120), complete: i.complete,
  naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}))"""


def broken_images(images: list[dict]) -> list[str]:
    """The ``src`` of every image that did not load."""
    return [img["src"] for img in images if not (img["complete"] and img["naturalWidth"] > 0)]


@pytest.mark.browser
def test_browser_harness_catches_errors_broken_images_network_and_dialogs(chromium_page, tmp_path):
    """The harness itself: a page that misbehaves is reported as misbehaving (so 'no errors' means something)."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><title>bad</title><h1>x</h1><img src='missing.png'>"
        "<script>console.error('boom'); setTimeout(() => { throw new Error('late') }, 0);"
        "fetch('http://example.invalid/x').catch(() => {}); alert('pwned');</script>"
    )
    chromium_page.open(bad)
    page = chromium_page.page
    assert page.title() == "bad" and broken_images(page.evaluate(IMAGES_JS)) == [(tmp_path / "missing.png").as_uri()]
    errors = " | ".join(chromium_page.errors)
    assert "boom" in errors and "late" in errors and "ERR_FILE_NOT_FOUND" in errors
    assert "http://example.invalid/x" in chromium_page.requests
    assert "http://example.invalid/x net::ERR_BLOCKED_BY_CLIENT" in errors  # stopped inside the browser
    assert chromium_page.dialogs == ["pwned"]
    assert page.context.browser.is_connected()


@pytest.mark.browser
def test_browser_is_always_ended(launch_chromium):
    """Leaving the browser's context ends every process it started, also when the body raised."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}

    def started() -> list[psutil.Process]:
        return [p for p in me.children(recursive=True) if p.pid not in before]

    def running(processes: list[psutil.Process]) -> list[psutil.Process]:
        alive = []
        for proc in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        return alive

    with launch_chromium() as browser:
        page = browser.new_page()
        assert page.evaluate("1 + 1") == 2
        processes = started()
        assert any("chromium" in p.name() for p in processes), processes
    assert not browser.is_connected() and running(processes) == []

    with pytest.raises(RuntimeError, match="test failed"), launch_chromium() as browser:
        processes = started()
        assert browser.new_page().evaluate("2 + 2") == 4
        raise RuntimeError("test failed")
    assert processes and running(processes) == []


def _assert_clean(watched, n_images: int) -> None:
    assert watched.errors == [], watched.errors
    assert {urlparse(u).scheme for u in watched.requests} <= {"file", "data"}, watched.requests
    assert watched.dialogs == [], watched.dialogs
    images = watched.page.evaluate(IMAGES_JS)
    assert len(images) == n_images and not broken_images(images), images
    assert watched.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways overflow


@pytest.mark.browser
def test_report_renders_in_chromium(report, chromium_page, tmp_path):
    index, cases = report
    page = chromium_page.page
    chromium_page.open(index)
    assert page.title().startswith("Explanations: concat / resnet18")
    assert page.evaluate("document.querySelector('h1').textContent").startswith("Explanations")
    assert page.evaluate("document.querySelectorAll('#cases-table tbody tr').length") == len(cases)
    _assert_clean(chromium_page, len(COHORT_FIGURES))
    shot = tmp_path / "index.png"
    page.screenshot(path=shot, full_page=True)
    links = page.evaluate("Array.from(document.querySelectorAll('#cases-table a')).map(a => a.href)")
    assert len(links) == len(cases) and all(Path(unquote(urlparse(u).path)).is_file() for u in links)

    chromium_page.open(links[0])  # follow the link
    assert page.title() == f"Case {cases[0].image_id}"
    assert page.evaluate("document.getElementById('case-title').textContent") == f"Case {cases[0].image_id}"
    _assert_clean(chromium_page, len(CASE_FIGURES))
    back = page.evaluate("document.getElementById('back').href")
    assert Path(unquote(urlparse(back).path)).resolve() == index.resolve()
    page.screenshot(path=tmp_path / "case.png", full_page=True)

    with Image.open(shot) as img:
        rgb = img.convert("RGB")
        assert img.format == "PNG" and img.width == 1280 and 900 <= img.height <= 12000
    assert np.asarray(rgb, dtype=float).std() > 20 and len(rgb.getcolors(1 << 24)) > 200  # not blank
    assert shot.stat().st_size > 30_000


@pytest.mark.browser
def test_hostile_metadata_is_inert_in_chromium(hostile_report, chromium_page):
    index, cases = hostile_report
    page = chromium_page.page
    titles = []
    for path in _pages(index):
        chromium_page.open(path)
        _assert_clean(chromium_page, len(COHORT_FIGURES) if path == index else len(CASE_FIGURES))
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert page.evaluate("document.scripts.length") == 0
        assert (
            page.evaluate("document.querySelectorAll('[onerror],[onload],[onclick],svg,iframe,object,embed').length")
            == 0
        )
        assert page.evaluate("Array.from(document.images).every(i => i.src.startsWith('data:image/png;base64,'))")
        assert page.evaluate("Array.from(document.links).every(a => a.protocol === 'file:')")
        assert PAYLOADS[0] in page.evaluate("document.body.innerText")  # visible, as text
        titles.append(page.title())
    assert set(titles[1:]) == {f"Case {c.image_id}" for c in cases}


def test_no_scientific_notation_and_losing_verdicts_in_red(tmp_path: Path, figure_dir: Path) -> None:
    case = make_case(0, "ISIC_0024306")
    case.probabilities = {c: (0.00004 if c != case.target_class else 0.99996) for c in CLASSES}
    cohort = make_cohort(cases=[case])
    cohort.mean_abs_shap["all"]["sex"] = 0.0002
    index = write_report(tmp_path, cohort, make_figures(figure_dir, [case]))
    pages = [index.read_text(), *(p.read_text() for p in (tmp_path / "cases").glob("*.html"))]
    for html in pages:
        assert not re.search(r"\d\.\d+e[-+]\d", html), "a number in scientific notation"
    assert "&lt;0.001" in pages[1] and "&lt;0.001" in pages[0]  # probability and mean |SHAP| below 0.001
    assert "±0.004" in pages[1] and "Background error" in pages[1]
    text = " ".join(parse(index).text)
    assert "does worse than a baseline on 1 comparison" in text
    worse = [a for tag, a in parse(index).tags if tag == "tr" and "worse" in (a.get("class") or "")]
    assert len(worse) == 1
    assert "invalid" in text and "different games" in pages[1]
    assert "Explained class" in text and "Selected as" in text  # per-class tables with n; the selection column


# ----------------------------------------------------------------------------- metadata on the map


def _maps_case(tmp_path: Path, figure_dir: Path) -> tuple[Path, CaseExplanation]:
    """A case of a map model with its two maps, drawn for real by the report's figure functions."""
    from multimodal_lesion.report.explanation_figures import age_maps_png, metadata_map_png

    case = make_case(0, "ISIC_0024306")
    yy, xx = np.mgrid[0:60, 0:80] / 60.0
    case.cam = np.exp(-((yy - 0.4) ** 2 + (xx - 0.5) ** 2) * 8).astype(np.float32)
    case.cam_without_metadata = np.exp(-((yy - 0.6) ** 2 + (xx - 0.8) ** 2) * 8).astype(np.float32)
    case.metadata_map_spearman, case.fusion = 0.4321, "maps"
    case.age_cams = {"20": case.cam, "80": case.cam_without_metadata}
    pixels = np.asarray(Image.open(figure_dir / "case0_image.png").convert("RGB").resize((80, 60)))
    drawn = {
        "metadata_map": metadata_map_png(
            pixels, case.cam, case.cam_without_metadata, tmp_path / "mm.png", case.metadata_map_spearman
        ),
        "age_maps": age_maps_png(pixels, case.age_cams, tmp_path / "ages.png", "45"),
    }
    cohort = make_cohort(cases=[case])
    cohort.fusion, cohort.metadata_map_spearman = "maps", {case.target_class: 0.4321, "all": 0.4321}
    index = write_report(tmp_path / "report", cohort, ReportFigures(cases={case.image_id: drawn}))
    return index, case


def test_case_page_shows_what_the_metadata_does_to_the_map(tmp_path: Path, figure_dir: Path) -> None:
    index, case = _maps_case(tmp_path, figure_dir)
    page = index.parent / "cases" / case_page_name(case.image_id)
    tags = parse(page)
    text = " ".join(tags.text)
    assert ("section", {"class": "card", "id": "metadata-on-map"}) in tags.tags
    assert "What the patient's metadata does to the map" in text and "0.432" in text
    assert "changes the layer's activations" in text  # the map model's wording, not the late model's
    captions = [a.get("alt") for t, a in tags.tags if t == "img"]
    assert any("every patient feature absent" in (c or "") for c in captions)
    assert any("at a few ages" in (c or "") for c in captions)
    index_tags = parse(index)
    assert ("table", {"id": "map-correlation", "class": "per-class"}) in index_tags.tags
    assert "Mean rank correlation" in " ".join(index_tags.text)
    plain = make_case(1, "ISIC_1")  # a case without the two maps has no such section
    write_report(tmp_path / "plain", make_cohort(cases=[plain]), None)
    assert "metadata-on-map" not in (tmp_path / "plain" / "cases" / case_page_name("ISIC_1")).read_text()


def test_explanations_json_carries_the_metadata_on_the_map(tmp_path: Path, figure_dir: Path) -> None:
    from multimodal_lesion.explain.pipeline import save_explanations

    _, case = _maps_case(tmp_path, figure_dir)
    cohort = make_cohort(cases=[case])
    cohort.fusion, cohort.metadata_map_spearman = "maps", {"all": float("nan")}
    case.metadata_map_spearman = float("nan")  # a constant map: no ranks, JSON null
    written = save_explanations(tmp_path / "out", cohort)
    import json

    data = json.loads(written.read_text())
    entry = data["cases"][0]["metadata_on_map"]
    assert entry["fusion"] == "maps" and entry["spearman"] is None
    saved = np.load(tmp_path / "out" / entry["cam_without_metadata"])
    np.testing.assert_array_equal(saved, case.cam_without_metadata)
    assert data["metadata_on_map"] == {"fusion": "maps", "mean_spearman": {"all": None}}


@pytest.mark.browser
def test_metadata_on_the_map_renders_in_chromium(tmp_path: Path, figure_dir: Path, chromium_page) -> None:
    index, case = _maps_case(tmp_path, figure_dir)
    chromium_page.open(index.parent / "cases" / case_page_name(case.image_id))
    page = chromium_page.page
    assert "0.432" in page.evaluate("document.getElementById('metadata-on-map').textContent")
    _assert_clean(chromium_page, 2)


# ----------------------------------------------------------------------------- pages drawn as chunks finish


def test_a_long_reports_last_chunk_is_drawn_by_the_explaining_process(tmp_path: Path) -> None:
    """In parallel mode the worker draws every chunk but the last, which this process draws itself (the
    computation is over); every case gets its page and figures either way."""
    from multimodal_lesion.explain.pipeline import ChunkView
    from multimodal_lesion.report.pages import CasePages

    cases = [make_case(k, f"ISIC_{24306 + k:07d}") for k in range(3)]
    for k, case in enumerate(cases):
        case.pixels = np.full((60, 80, 3), 40 * k, dtype=np.uint8)
        case.cam = np.random.default_rng(k).random((60, 80)).astype(np.float32)
    ids = [c.image_id for c in cases]
    pages = CasePages(tmp_path, parallel=True)
    try:
        for offset, part in ((0, cases[:2]), (2, cases[2:])):
            pages.write(ChunkView(offset, part, None, ids, list(CLASSES), dict(CLASS_NAMES)))  # type: ignore[arg-type]
        drawn = pages.finish()
    finally:
        pages.close()
    assert set(drawn) == set(ids) and all(drawn[i]["overlay"].is_file() for i in ids)  # type: ignore[union-attr]
    assert 0 < pages.here < pages.seconds  # this process drew the last chunk, the worker the first
    assert all((tmp_path / "cases" / case_page_name(i)).is_file() for i in ids)
