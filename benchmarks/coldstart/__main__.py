"""``python -m benchmarks.coldstart``: container cold start vs image size, OCI beside Nydus, in containerd.

Builds the images (:mod:`.images`), starts docker-registry in a network namespace shaped to ``--rate``
(:mod:`.netns`), pushes them, then times each mode at each size from a cold state (:mod:`.runs`), repetitions
interleaved; prints the medians as a markdown table and writes what ``--json``, ``--plot`` and ``--markdown`` ask.
Needs root (namespaces, mounts, containerd, drop_caches).

With ``--vm`` the runs are in the test VM instead (:mod:`.vm`, :mod:`.guest`): OCI (skopeo + umoci) and Nydus
lazy over fscache (cachefilesd-py), at 100 MiB and 2 GiB unless ``--sizes``; ``--markdown`` then writes only
the page's VM section (the host's runs' page keeps it).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from erofs.errors import UsageError
from erofs.units import parse_size
from tests.support.registry import RegistryServer

from .images import WORKLOAD, oci_images, publish
from .netns import ShapedNetns, rate_bits
from .report import page, plot_runs, splice, table, vm_section
from .runs import MODES, VM_MODES, Run, cold_start
from .vm import vm_cold_start

FULL_SIZES = "100M,500M,1G,2G"
QUICK_SIZES = "100M,500M"
VM_SIZES = "100M,2G"


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--sizes", default=None, help=f"Image sizes (OCI, gzip), comma-separated [{FULL_SIZES}].")
@click.option("--rate", default="200mbit", show_default=True, help="The registry's link rate (tc units).")
@click.option("--quick", is_flag=True, help=f"Sizes {QUICK_SIZES} (unless --sizes), one repetition.")
@click.option("--repetitions", type=click.IntRange(1, 20), default=None, help="Runs per point [3; --quick: 1].")
@click.option("--modes", default=None, help=f"Which modes to run [{','.join(MODES)}; --vm: {','.join(VM_MODES)}].")
@click.option("--vm", is_flag=True, help=f"Run in the test VM (kernel-test/run-vm, fscache) [sizes {VM_SIZES}].")
@click.option("--base", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="A root filesystem directory for the base layer [the files of a few of this machine's packages].")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Images are built and kept here for the next run [a new temporary directory, removed after].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the runs as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write the plot (PNG).")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), help="Write the results page.")
@click.option("--from-json", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Measure nothing: report the runs of an earlier --json.")
def main(sizes: str | None, rate: str, quick: bool, repetitions: int | None, modes: str | None, vm: bool,
         base: Path | None, work_dir: Path | None, json_out: Path | None, plot: Path | None, markdown: Path | None,
         from_json: Path | None) -> None:  # fmt: skip
    """Time container cold starts (pull to first output line) vs image size: OCI, Nydus lazy, Nydus with a
    trace-based prefetch table; registry behind a link shaped to RATE."""
    try:
        chosen = sizes or (VM_SIZES if vm else QUICK_SIZES if quick else FULL_SIZES)
        size_list = [parse_size(s.strip(), "--sizes") for s in chosen.split(",")]
        rate_bits(rate)
    except (UsageError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    known = VM_MODES if vm else MODES
    mode_list = [m.strip() for m in modes.split(",")] if modes else list(known)
    if unknown := [m for m in mode_list if m not in known]:
        raise click.UsageError(f"--modes: unknown {', '.join(unknown)} (known{' with --vm' if vm else ''}: "
                               f"{', '.join(known)})")  # fmt: skip
    if from_json is not None:
        try:
            saved = json.loads(from_json.read_text())
            runs, facts = [Run(**r) for r in saved["runs"]], saved["facts"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise click.UsageError(f"--from-json: not this command's JSON: {e}") from None
    else:
        if os.geteuid() != 0:
            raise click.ClickException("needs root: network namespaces, mounts, containerd and drop_caches")
        runs, facts = _measure(size_list, rate, repetitions or (1 if quick or vm else 3), mode_list, base, work_dir,
                               vm)  # fmt: skip
    click.echo(table(runs))
    if json_out:
        json_out.write_text(json.dumps({"runs": [r.as_json() for r in runs], "facts": facts}, indent=1) + "\n")
    if plot:
        plot_runs(runs, plot, f"cold start at {facts['rate']}, {facts['repetitions']} repetition(s), medians")
    if markdown:
        before = markdown.read_text() if markdown.exists() else ""
        markdown.write_text(splice(before, vm_section(runs, facts)) if vm else splice(page(runs, facts, plot), before))


def _measure(sizes: list[int], rate: str, reps: int, modes: list[str], base: Path | None,
             work_dir: Path | None, vm: bool) -> tuple[list[Run], dict]:  # fmt: skip
    """Build and publish the images, then the runs (repetitions outermost, so noise spreads over all points)."""
    tmp = Path(tempfile.mkdtemp(prefix="nydus-coldstart-"))
    work = work_dir or tmp / "work"
    work.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), _load()
    runs: list[Run] = []
    guest: dict = {}
    try:
        click.echo(f"building images for {', '.join(str(s) for s in sizes)} bytes in {work}", err=True)
        layout, images = oci_images(work, sizes, base)
        with ShapedNetns(rate) as ns, RegistryServer(tmp / "registry", netns=ns.name, addr=ns.ns_addr,
                                                     accesslog=True) as registry:  # fmt: skip
            publish(work, layout, images, registry.host, prefetch="nydus-prefetch" in modes)
            measured = time.time()
            for rep in range(reps):
                for image in images:
                    for mode in modes:
                        if vm:
                            r, guest = vm_cold_start(mode, image, registry, rep)
                        else:
                            r = cold_start(mode, image, registry, tmp, rep)
                        runs.append(r)
                        click.echo(f"{mode:15} {image.size_bytes / (1 << 20):7.0f} MiB rep {rep}: {r.seconds:6.2f} s "
                                   f"(pull {r.pull_seconds:.2f} s), fetched {r.bytes_fetched / (1 << 20):.1f} MiB",
                                   err=True)  # fmt: skip
    except (RuntimeError, AssertionError, OSError, subprocess.SubprocessError) as e:
        raise click.ClickException(str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    facts = {"rate": rate, "repetitions": reps, "workload": WORKLOAD, "kernel": platform.release(),
             "cpus": os.cpu_count(), "load_before": load_before, "load_after": _load(),
             "build_minutes": round((measured - started) / 60, 1),
             "run_minutes": round((time.time() - measured) / 60, 1)}  # fmt: skip
    if vm:
        facts["vm"] = guest
    return runs, facts

if __name__ == "__main__":
    sys.exit(main())
