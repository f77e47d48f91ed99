"""``nydus-erofs``: the command group.  Each subcommand lives in its own module and is registered as an
entry point in the ``nydus_erofs.commands`` group (pyproject.toml), so packages above ``erofs`` (the daemon's
``mount``) add commands without ``erofs`` importing them.  Only the invoked command's module is imported, so a
command starts without paying for the others' imports.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys

import click

from erofs.errors import NydusErofsError

COMMANDS_GROUP = "nydus_erofs.commands"


def entry_points(group: str) -> dict[str, str]:
    """``name: "module:attr"`` of an entry-point group, from the entry_points.txt of the distributions on
    sys.path, the first distribution of a name winning (as importlib.metadata orders them).  importlib.metadata
    would read the same files, but importing it costs ~30 ms of the ~80 ms every command spends starting."""
    found: dict[str, str] = {}
    seen: set[str] = set()
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for name in names:
            if not name.endswith(".dist-info"):
                continue
            dist = name.split("-", 1)[0].lower().replace(".", "_")
            if dist in seen:
                continue
            seen.add(dist)
            try:
                with open(os.path.join(entry, name, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            section = None
            for line in text.splitlines():
                line = line.strip()
                if line.startswith("["):
                    section = line.strip("[]").strip()
                elif section == group and "=" in line and not line.startswith(("#", ";")):
                    key, value = line.split("=", 1)
                    found.setdefault(key.strip(), (value.split() or [""])[0])  # "module:attr [extras]"
    return found


class _Group(click.Group):
    """Commands are loaded on first use: ``nydus-erofs build`` imports the build command's module only (the
    group's ``--help`` lists, and so loads, all of them)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._entry_points: dict[str, str] | None = None

    def _declared(self) -> dict[str, str]:
        if self._entry_points is None:
            self._entry_points = entry_points(COMMANDS_GROUP)
        return self._entry_points

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in self._declared() if self.get_command(ctx, name) is not None)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = self.commands.get(cmd_name)
        if cmd is not None:
            return cmd
        value = self._declared().get(cmd_name)
        if value is None:
            return None
        module_name, _, attr = value.partition(":")
        try:
            cmd = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # declared ahead of its module
            if e.name and module_name.startswith(e.name):
                return None
            raise
        for part in attr.split("."):
            cmd = getattr(cmd, part)
        cmd.params.append(_DEBUG_AFTER)  # `nydus-erofs build --debug ...` as well as `nydus-erofs --debug build`
        self.add_command(cmd, cmd_name)
        return cmd

    def main(self, *args, **kwargs):  # one-line usage errors too, not click's usage block
        _guard_std_fds()
        for sig in (signal.SIGTERM, signal.SIGHUP):  # (a signal ignored by whoever started us stays ignored)
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _terminate)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("nydus-erofs: aborted", err=True)
            sys.exit(130)
        except click.exceptions.NoArgsIsHelpError as e:  # no command: the help, not an "error: Usage: ..." block
            click.echo(e.format_message(), err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"nydus-erofs: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:  # one line, not click's blank line + "Aborted!"
            if ctx.obj and ctx.obj.get("debug"):
                raise
            signum = e.signum if isinstance(e, _Terminated) else signal.SIGINT
            click.echo(f"nydus-erofs: {'aborted' if signum == signal.SIGINT else 'terminated'}", err=True)
            sys.exit(128 + signum)
        except EOFError as e:  # click would call it an abort (Ctrl-D at a prompt); here it is an error
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"nydus-erofs: error: {e or 'unexpected end of file'}", err=True)
            sys.exit(1)
        except NydusErofsError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"nydus-erofs: error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = f": {os.fsdecode(e.filename)}" if e.filename else ""
            click.echo(f"nydus-erofs: error: {e.strerror or e}{where}", err=True)
            sys.exit(1)


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP as an exception: the cleanup of Ctrl-C (temporary files and new output removed),
    where the default action would end the process on the spot and leave them."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated(signum)


def _guard_std_fds() -> None:
    """Put /dev/null on a closed stdin, stdout or stderr: otherwise the next file opened (a blob being
    written) would get that fd, and whatever is written to the stream would land in it."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 - lives as long as the process


def _set_debug(ctx: click.Context, _param: click.Parameter | None = None, value: bool = True) -> None:
    """``--debug``: tracebacks instead of one-line errors, and the libraries' debug log on stderr."""
    if not value:
        return
    root = ctx.find_root()
    if root.obj is None:
        root.obj = {}
    root.obj["debug"] = True
    logging.basicConfig(level=logging.DEBUG, format="nydus-erofs: %(levelname)s: %(name)s: %(message)s", force=True)


_DEBUG_AFTER = click.Option(["--debug"], is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                            help="Show tracebacks instead of one-line errors.")  # fmt: skip


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nydus-erofs")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Build, inspect and serve Nydus RAFS v6 (EROFS) container images."""
    ctx.obj = {"debug": False}
    # what the libraries log about a failure comes out once, as the error line (not via logging.lastResort)
    logging.getLogger().addHandler(logging.NullHandler())
    if debug:
        _set_debug(ctx)
