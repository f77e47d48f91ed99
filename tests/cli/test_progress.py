"""Long commands show a progress line on a terminal (issue 20; issue 11 item 7): ``build``, ``convert``, ``unpack``
and ``check`` redraw one line on stderr while they work, erase it at the end, and show nothing with ``--json`` or
when stderr is not a terminal."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import CLI, run
from tests.support.oci import MT_LAYER, Layout, tar_layer
from tests.support.terminal import run_in_terminal

BIG = 8  # MiB of random file data (the line is drawn at the first piece of work, then at most 10 times a second)


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("progress") / "src"
    src.mkdir()
    for i in range(BIG):
        (src / f"big{i}").write_bytes(os.urandom(1 << 20))
    small = src / "small"
    small.mkdir()
    for i in range(500):
        (small / f"f{i}").write_bytes(b"x" * (i % 700))
    return src


@pytest.fixture(scope="module")
def big_image(big_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("progress-image") / "out"
    r = run("build", big_tree, "-o", out, "--chunk-size", "64KiB")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def big_layout(big_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    lay = Layout(tmp_path_factory.mktemp("progress-layout") / "L")
    files = {f"big{i}": (big_tree / f"big{i}").read_bytes() for i in range(BIG)}
    lay.tag(lay.manifest([(tar_layer(files), MT_LAYER)]), "v1")
    return lay.root


def _commands(tree: Path, image: Path, layout: Path, tmp: Path) -> dict[str, list[str | os.PathLike[str]]]:
    return {
        "building": [CLI, "build", tree, "-o", tmp / "out", "--chunk-size", "64KiB", "--compressor", "zstd"],
        "converting": [CLI, "convert", f"oci:{layout}:v1", f"oci:{tmp / 'nydus'}:v1-nydus"],
        "unpacking": [CLI, "unpack", image / "image.boot", "-o", tmp / "unpacked"],
        "verifying": [CLI, "check", image / "image.boot"],
    }


@pytest.mark.parametrize("label", ["building", "converting", "unpacking", "verifying"])
def test_progress_line_on_a_terminal(label: str, big_tree: Path, big_image: Path, big_layout: Path,
                                     tmp_path: Path) -> None:  # fmt: skip
    args = _commands(big_tree, big_image, big_layout, tmp_path)[label]
    r = run_in_terminal(args)
    assert r.returncode == 0, r.terminal
    lines = [ln for ln in r.progress_lines() if ln.startswith("\r" + label)]
    assert lines, f"no progress line in {r.terminal[-500:]!r}"
    assert any("%" in ln for ln in lines) or label in ("building", "converting")  # those count bytes read
    assert "B" in lines[0] or "entries" in lines[0]
    assert re.search(r"\r {20,}\r", r.terminal), "the line is not erased at the end"


@pytest.mark.parametrize("label", ["building", "converting", "verifying"])
def test_no_progress_with_json(label: str, big_tree: Path, big_image: Path, big_layout: Path, tmp_path: Path) -> None:
    args = [*_commands(big_tree, big_image, big_layout, tmp_path)[label], "--json"]
    r = run_in_terminal(args)
    assert r.returncode == 0, r.terminal
    assert label not in r.terminal and not r.progress_lines()
    assert r.stdout.lstrip().startswith("{")


@pytest.mark.parametrize("label", ["building", "converting", "unpacking", "verifying"])
def test_no_progress_when_stderr_is_a_pipe(label: str, big_tree: Path, big_image: Path, big_layout: Path,
                                           tmp_path: Path) -> None:  # fmt: skip
    args = _commands(big_tree, big_image, big_layout, tmp_path)[label]
    r = subprocess.run(args, capture_output=True, timeout=60)  # bytes: text mode would turn a "\r" into "\n"
    assert r.returncode == 0, r.stderr
    assert b"\r" not in r.stderr and label.encode() not in r.stderr
