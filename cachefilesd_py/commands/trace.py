"""``nydus-erofs trace MOUNTPOINT [--output FILE] [--json]``: the files a fanotify mount has read, first access
first, as a prefetch list (``build --prefetch-list``); see :mod:`cachefilesd_py.mount.trace`."""

from __future__ import annotations

import json
import os

import click

from cachefilesd_py.mount.trace import read_trace
from erofs.errors import UsageError


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write the list to FILE, not stdout.")
@click.option("--json", "as_json", is_flag=True, help="With offsets, lengths and seconds since the mount.")
def trace(mountpoint: str, output: str | None, as_json: bool) -> None:
    """Print the files MOUNTPOINT's daemon saw read, one absolute path a line, first access first."""
    header, entries = read_trace(mountpoint)
    if header is None:
        raise UsageError(f"{mountpoint}: no access trace (not a fanotify mount of nydus-erofs, or never mounted)")
    if as_json:
        text = json.dumps({"mountpoint": header.get("mountpoint"), "mount_time": header.get("mount_time"),
                           "max_entries": header.get("max_entries"), "files": entries}, indent=2) + "\n"  # fmt: skip
    else:
        text = "".join(e["path"] + "\n" for e in entries)
    if output is None:
        click.echo(text, nl=False)
        return
    tmp = f"{output}.tmp"
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    os.replace(tmp, output)
