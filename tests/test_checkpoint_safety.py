"""A checkpoint that carries a pickled payload is refused before the payload runs (issue 7)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


class _Payload:
    """Unpickling this runs a shell command (creates ``marker``): what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _poison(checkpoint: Path, marker: Path) -> None:
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, checkpoint)


@pytest.fixture(scope="module")
def poisoned(end2end_run, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of a finished run whose best.pt carries a payload; returns (run folder, marker file)."""
    run = shutil.copytree(end2end_run.folder, tmp_path_factory.mktemp("poisoned") / "run")
    marker = run.parent / "PWNED"
    _poison(run / "best.pt", marker)
    return run, marker


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_malicious_checkpoint_is_refused_before_it_runs(
    cli, poisoned: tuple[Path, Path], cli_ham: Path, command: str
) -> None:
    run, marker = poisoned
    extra = ["--image", next(cli_ham.rglob("*.jpg"))] if command == "predict" else []
    line = cli.error(cli(command, "--run", run, *extra), command, str(run / "best.pt"), "refused")
    assert "posix.system" in line and "weights_only" not in line, line  # names what it refused, no unsafe advice
    assert not marker.exists(), "the pickled payload ran"


@pytest.mark.slow
def test_the_malicious_checkpoint_really_is_hostile(cli, poisoned: tuple[Path, Path]) -> None:
    """An unsafe load (what the package never does) runs the payload: the refusal above is meaningful."""
    run, marker = poisoned
    unsafe = f"import torch; torch.load({str(run / 'best.pt')!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", unsafe], env=cli.env, check=True, capture_output=True)
    assert marker.exists()
    marker.unlink()
