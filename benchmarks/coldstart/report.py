"""The results: medians per (mode, size), as a markdown table and a two-panel matplotlib plot (seconds to the
first output line vs image size; bytes fetched vs image size), one line per mode."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from .runs import MODES, VM_MODES, Run

_MIB = 1 << 20
LABELS = {"oci": "OCI (ctr pull + run)", "nydus": "Nydus lazy", "nydus-prefetch": "Nydus + trace prefetch",
          "vm-oci": "VM/TCG: OCI (skopeo + umoci + chroot)", "vm-fscache": "VM/TCG: Nydus lazy over fscache"}
#: the heading of the page's section on the VM's runs (``--vm``); the host's page keeps it
VM_HEADING = "## In the test VM: Nydus over fscache (TCG, relative figures)"


def medians(runs: Sequence[Run]) -> dict[tuple[str, int], tuple[float, float, float]]:
    """(mode, size) → median seconds, median pull seconds, median bytes fetched."""
    out = {}
    for key in sorted({(r.mode, r.size_bytes) for r in runs}):
        group = [r for r in runs if (r.mode, r.size_bytes) == key]
        out[key] = (statistics.median(r.seconds for r in group), statistics.median(r.pull_seconds for r in group),
                    statistics.median(r.bytes_fetched for r in group))  # fmt: skip
    return out


def table(runs: Sequence[Run]) -> str:
    """A markdown table: one row per size, per mode its start seconds and MiB fetched (% of the image)."""
    med = medians(runs)
    sizes = sorted({size for _, size in med})
    modes = [m for m in MODES + VM_MODES if any(k[0] == m for k in med)]
    head = "| image (OCI, gzip) | " + " | ".join(f"{LABELS[m]}: s (pull s) / MiB fetched" for m in modes) + " |"
    lines = [head, "|" + "---|" * (len(modes) + 1)]
    for size in sizes:
        cells = []
        for m in modes:
            if (m, size) not in med:
                cells.append("–")
                continue
            secs, pull, fetched = med[m, size]
            cells.append(f"{secs:.1f} ({pull:.1f}) / {fetched / _MIB:.1f} ({100 * fetched / size:.1f}%)")
        lines.append(f"| {size / _MIB:.0f} MiB | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(runs: Sequence[Run], path: Path, title: str) -> None:
    import matplotlib  # here: ~1 s of CPU to import, and only --plot draws (the page's text does without)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = medians(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in MODES + VM_MODES:
        points = sorted((size, v) for (mode, size), v in med.items() if mode == m)
        if not points:
            continue
        xs = [size / _MIB for size, _ in points]
        left.plot(xs, [v[0] for _, v in points], marker="o", label=LABELS[m])
        right.plot(xs, [v[2] / _MIB for _, v in points], marker="o", label=LABELS[m])
    left.set(xlabel="image size (MiB, OCI gzip)", ylabel="seconds: pull to first output line", title="cold start")
    right.set(xlabel="image size (MiB, OCI gzip)", ylabel="MiB fetched from the registry", title="bytes fetched")
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _targets(runs: Sequence[Run]) -> list[str]:
    """The issue's targets, each with what was measured (at the smallest and largest size measured)."""
    med = medians(runs)
    sizes = sorted({size for _, size in med})
    small, big = sizes[0], sizes[-1]
    out = []
    if ("nydus", small) in med and ("nydus", big) in med:
        ratio = med["nydus", big][0] / med["nydus", small][0]
        out.append(f"Nydus lazy start at {big / _MIB:.0f} MiB within 1.5x its start at {small / _MIB:.0f} MiB: "
                   f"{ratio:.2f}x ({'met' if ratio <= 1.5 else 'not met'})")  # fmt: skip
    if ("nydus", big) in med and ("oci", big) in med:
        share = med["nydus", big][0] / med["oci", big][0]
        out.append(f"at {big / _MIB:.0f} MiB, Nydus lazy under 15% of the OCI start: {100 * share:.1f}% "
                   f"({'met' if share < 0.15 else 'not met'})")  # fmt: skip
    for mode in ("nydus", "nydus-prefetch"):
        shares = [(s, med[mode, s][2] / s) for s in sizes if (mode, s) in med]
        if shares:
            each = ", ".join(f"{100 * share:.1f}% at {s / _MIB:.0f} MiB" for s, share in shares)
            met = sum(share < 0.05 for _, share in shares)
            out.append(f"{LABELS[mode]}: bytes fetched under 5% of the image: {each} (met at {met} of "
                       f"{len(shares)} sizes)")  # fmt: skip
    pairs = [(med["nydus-prefetch", s][0], med["nydus", s][0]) for s in sizes
             if ("nydus", s) in med and ("nydus-prefetch", s) in med]  # fmt: skip
    if pairs:
        faster = sum(p <= n for p, n in pairs)
        out.append(f"trace-based prefetch no slower than lazy: at {faster} of {len(pairs)} sizes "
                   f"(prefetch/lazy: {', '.join(f'{p / n:.2f}' for p, n in pairs)})")  # fmt: skip
    return out


def _took(facts: dict) -> str:
    if "build_minutes" in facts:
        return (f"building and converting the images took {facts['build_minutes']} min, "
                f"the runs {facts['run_minutes']} min")
    return f"the command took {facts['minutes']} min, building and converting the images included"


def page(runs: Sequence[Run], facts: dict, plot: Path | None) -> str:
    """docs/coldstart.md: how it was measured, the table, the plot, the issue's targets against the numbers."""
    sizes = sorted({r.size_bytes for r in runs})
    lines = [
        "# Container cold start vs image size",
        "",
        "Made by `.venv/bin/python -m benchmarks.coldstart` (benchmarks/coldstart/): time from the pull command to "
        "the container's first line of output, in containerd, for an image of a real base (the files of this machine's "
        "Debian 12 packages of about a minbase, plus python3: about 70 MB) plus layers of random files the "
        "workload never reads. The registry (docker-registry) runs in a network namespace whose veth is shaped "
        f"with tbf to {facts['rate']}; bytes fetched are the sizes of the GET responses in its access log. "
        "Every run is cold: a new containerd (content store, snapshots, blob cache empty) and the page cache "
        "dropped.",
        "",
        f"- workload: `bash -c '{facts['workload']}'`",
        "- modes: OCI = `ctr image pull` + `ctr run` (containerd's overlayfs snapshotter); Nydus lazy = "
        "`nydus-erofs pull` + `ctr run --snapshotter nydus-erofs` (fanotify mounts); Nydus + trace prefetch = the "
        "same, on an image converted with `--prefetch-list` from `nydus-erofs trace` of the workload",
        f"- sizes: {', '.join(f'{s / _MIB:.0f} MiB' for s in sizes)} (OCI layers, gzip); "
        f"{facts['repetitions']} repetition(s) per point, repetitions interleaved, medians; {_took(facts)}",
        f"- machine: kernel {facts['kernel']}, {facts['cpus']} CPUs shared with other jobs: load average "
        f"{facts['load_before']} before, {facts['load_after']} after (1/5/15 min) — the times are noisy",
        "",
        "Each cell: seconds to the first output line (of which the pull), and MiB fetched (share of the image).",
        "",
        table(runs),
    ]
    if plot is not None:
        lines += [f"![cold start vs image size]({plot.name})", ""]
    lines += ["## The issue's targets, measured", ""] + [f"- {t}" for t in _targets(runs)] + [""]
    return "\n".join(lines)


def vm_section(runs: Sequence[Run], facts: dict) -> str:
    """The page's section on the runs in the test VM (``--vm``): how, the table, fscache against OCI."""
    med = medians(runs)
    guest = facts.get("vm", {})
    lines = [
        VM_HEADING,
        "",
        "Made by `.venv/bin/python -m benchmarks.coldstart --vm` (benchmarks/coldstart/vm.py, guest.py): the same "
        "images and registry (docker-registry in the namespace shaped with tbf to "
        f"{facts['rate']}; bytes fetched from its access log), but each run in a fresh test VM "
        f"(kernel-test/run-vm: kernel {guest.get('kernel', '?')}, CPU \"{guest.get('cpu', '?')}\", "
        f"{guest.get('mem_mb', '?')} MB), which reaches the registry through qemu's user-mode network: cold by "
        "construction (new page cache, empty cachefiles cache). No containerd in the VM: the runs are the "
        "mount + overlay + chroot path. Nydus lazy over fscache = cachefilesd-py started (not timed), then "
        "`nydus-erofs mount docker://… --mode fscache` (the daemon fetches the bootstrap and binds the image, "
        "the kernel mounts it by fsid), an overlay over it and the workload in a chroot; OCI = `skopeo copy` + "
        "`umoci unpack` + the workload in a chroot. The guest runs under TCG, several times slower than the "
        "host: compare the rows with each other, not with the host's table above.",
        "",
        f"- {facts['repetitions']} repetition(s) per point; {_took(facts)}; host load average "
        f"{facts['load_before']} before, {facts['load_after']} after",
        "",
        table(runs),
    ]
    sizes = sorted({size for _, size in med})
    for size in sizes:
        if ("vm-fscache", size) in med and ("vm-oci", size) in med:
            share = med["vm-fscache", size][0] / med["vm-oci", size][0]
            lines.append(f"- at {size / _MIB:.0f} MiB, Nydus over fscache starts in {100 * share:.1f}% of the "
                         "OCI time")  # fmt: skip
    if len(sizes) > 1 and all(("vm-fscache", s) in med for s in (sizes[0], sizes[-1])):
        ratio = med["vm-fscache", sizes[-1]][0] / med["vm-fscache", sizes[0]][0]
        lines.append(f"- Nydus over fscache at {sizes[-1] / _MIB:.0f} MiB: {ratio:.2f}x its start at "
                     f"{sizes[0] / _MIB:.0f} MiB")  # fmt: skip
    return "\n".join(lines) + "\n"


def splice(page_text: str, keep_from: str) -> str:
    """``page_text`` without its VM section, then the VM section of ``keep_from`` (or ``keep_from`` itself
    when it is one)."""
    head = page_text.split(VM_HEADING, 1)[0].rstrip("\n")
    _, found, tail = keep_from.partition(VM_HEADING)
    if not found:
        return head + "\n"
    return f"{head}\n\n{VM_HEADING}{tail}" if head else f"{VM_HEADING}{tail}"
