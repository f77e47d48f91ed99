"""The ``nydus-erofs`` subcommands, one module each, and the options several of them share."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from erofs.units import parse_size

F = TypeVar("F", bound=Callable[..., object])


class Size(click.ParamType):
    """A size option ('1MiB', '512k', '0x100000'): bytes, or a one-line error naming the option."""

    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        option = param.opts[0] if param is not None and param.opts else None
        return parse_size(str(value), option)


SIZE = Size()


def blob_source_options(fn: F) -> F:
    """``--blob-dir`` and ``--device``: where a command reads an image's blobs from."""
    fn = click.option(
        "--device",
        "devices",
        multiple=True,
        type=click.Path(exists=True, dir_okay=False),
        help="A blob/device file, in device-table order (repeatable; for plain EROFS images).",
    )(fn)
    return click.option(
        "--blob-dir", type=click.Path(exists=True, file_okay=False), help="Directory of blob files named by id."
    )(fn)
