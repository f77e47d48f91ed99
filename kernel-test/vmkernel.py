"""Find or build the test VM's kernel.

A kernel *fits* when its .config has every ``=y`` option of ``fragment.config``. The choice, in order:

1. ``$NYDUS_EROFS_KERNEL`` (a bzImage path), taken as is;
2. ``../shared/kernel/bzImage`` beside the checkout, when its ``config`` fits;
3. ``kernel-test/.cache/<sha256 of fragment.config>/bzImage``, built earlier by this module;
4. a new build from Debian's ``linux-source-6.12``: ``make tinyconfig``, ``merge_config.sh`` with the fragment,
   ``make olddefconfig``, ``make bzImage`` (about 10 minutes on 2 cores), stored in that cache folder.

Stdlib only: ``build-kernel`` and ``run-vm`` run before the project's virtualenv exists.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FRAGMENT = HERE / "fragment.config"
CACHE_ROOT = HERE / ".cache"
SHARED_KERNEL = REPO.parent / "shared" / "kernel"
ENV_KERNEL = "NYDUS_EROFS_KERNEL"

SOURCE_PACKAGE = "linux-source-6.12"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
BUILD_PACKAGES = (SOURCE_PACKAGE, "build-essential", "bc", "bison", "flex", "libelf-dev", "libssl-dev",
                  "xz-utils", "cpio")

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_NOT_SET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


class KernelError(Exception):
    """No usable kernel, or the build failed; the message says what to do."""


def parse_config(text: str) -> dict[str, str]:
    """Options of a .config or fragment: name -> value; ``# CONFIG_X is not set`` reads as ``n``."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := _SET.match(line):
            options[m.group(1)] = m.group(2)
        elif m := _NOT_SET.match(line):
            options[m.group(1)] = "n"
    return options


def required_options(fragment_text: str) -> list[str]:
    """The fragment's ``=y`` options, in file order: what a fitting kernel must have built in."""
    return [name for name, value in parse_config(fragment_text).items() if value == "y"]


def missing_options(config_text: str, required: list[str]) -> list[str]:
    """The required options that ``config_text`` does not have as ``=y``."""
    have = parse_config(config_text)
    return [name for name in required if have.get(name) != "y"]


def fragment_digest(fragment: Path = FRAGMENT) -> str:
    return hashlib.sha256(fragment.read_bytes()).hexdigest()


def cache_dir(fragment: Path = FRAGMENT, cache_root: Path = CACHE_ROOT) -> Path:
    return cache_root / fragment_digest(fragment)


@dataclass(frozen=True)
class Choice:
    bzimage: Path
    origin: str  # "env", "shared", "cache" or "built"


def fits(kernel_dir: Path, fragment: Path = FRAGMENT) -> tuple[bool, str]:
    """Whether ``kernel_dir`` holds a bzImage whose ``config`` fits the fragment, and why not."""
    bzimage, config = kernel_dir / "bzImage", kernel_dir / "config"
    if not bzimage.is_file():
        return False, f"{bzimage}: no such file"
    if not config.is_file():
        return False, f"{config}: no such file (cannot tell whether {bzimage} fits)"
    missing = missing_options(config.read_text(errors="replace"), required_options(fragment.read_text()))
    if missing:
        return False, f"{bzimage} lacks {', '.join(missing)}"
    return True, f"{bzimage} fits {fragment}"


def select_kernel(
    fragment: Path = FRAGMENT,
    env: Mapping[str, str] | None = None,
    shared_dir: Path = SHARED_KERNEL,
    cache_root: Path = CACHE_ROOT,
) -> tuple[Choice | None, list[str]]:
    """The kernel to boot without building one, or None; plus the reasons each candidate was passed over."""
    env = os.environ if env is None else env
    reasons: list[str] = []
    override = env.get(ENV_KERNEL)
    if override:
        path = Path(override)
        if not path.is_file():
            raise KernelError(f"${ENV_KERNEL}={override}: no such file")
        return Choice(path.resolve(), "env"), reasons
    for origin, directory in (("shared", shared_dir), ("cache", cache_dir(fragment, cache_root))):
        ok, why = fits(directory, fragment)
        if ok:
            return Choice((directory / "bzImage").resolve(), origin), reasons
        reasons.append(f"{origin}: {why}")
    return None, reasons


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    print("build-kernel: $", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def _install_sources() -> None:
    """Install Debian's kernel sources and the build tools (as root), unless already there."""
    have_tools = all(shutil.which(tool) for tool in ("make", "gcc", "bison", "flex", "bc"))
    if SOURCE_TARBALL.is_file() and have_tools and Path("/usr/include/libelf.h").is_file():
        return
    if os.geteuid() != 0:
        raise KernelError(f"the kernel build needs {' '.join(BUILD_PACKAGES)}: "
                          f"run `apt-get install {' '.join(BUILD_PACKAGES)}` as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q",
                    "--no-install-recommends", *BUILD_PACKAGES], check=True, env=env)
    if not SOURCE_TARBALL.is_file():
        raise KernelError(f"{SOURCE_PACKAGE} is installed but {SOURCE_TARBALL} is missing")


def build_kernel(fragment: Path = FRAGMENT, cache_root: Path = CACHE_ROOT, jobs: int | None = None,
                 keep_tree: bool = False) -> Path:
    """Build a bzImage from linux-source-6.12 with tinyconfig + fragment into the cache; return its path."""
    _install_sources()
    dest = cache_dir(fragment, cache_root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="build-", dir=dest.parent))
    try:
        _run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(work)])
        (tree,) = [p for p in work.iterdir() if p.is_dir()]
        make = ["make", "ARCH=x86_64", f"-j{jobs}"]
        _run([*make, "tinyconfig"], cwd=tree)
        _run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment.resolve())], cwd=tree)
        _run([*make, "olddefconfig"], cwd=tree)
        config_text = (tree / ".config").read_text()
        missing = missing_options(config_text, required_options(fragment.read_text()))
        if missing:
            raise KernelError(f"olddefconfig dropped {', '.join(missing)}: a dependency of these options is "
                              f"missing from {fragment}")
        _run([*make, "bzImage"], cwd=tree)
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=dest.parent))
        staging.chmod(0o755)
        shutil.copyfile(tree / "arch" / "x86" / "boot" / "bzImage", staging / "bzImage")
        shutil.copyfile(tree / ".config", staging / "config")
        shutil.copyfile(fragment, staging / "fragment.config")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    except subprocess.CalledProcessError as exc:
        raise KernelError(f"kernel build failed: {' '.join(map(str, exc.cmd))} exited {exc.returncode}"
                          f" (build tree kept in {work})") from exc
    if not keep_tree:
        shutil.rmtree(work, ignore_errors=True)
    return dest / "bzImage"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="build-kernel",
        description="Print the path of a bzImage that fits kernel-test/fragment.config, building one if needed "
                    f"(from Debian's {SOURCE_PACKAGE}; about 10 minutes on 2 cores).",
    )
    parser.add_argument("--fragment", type=Path, default=FRAGMENT, help="config fragment (default: %(default)s)")
    parser.add_argument("--shared", type=Path, default=SHARED_KERNEL,
                        help="folder of a prebuilt bzImage + config to use when it fits (default: %(default)s)")
    parser.add_argument("--no-build", action="store_true", help="only look; exit 1 when nothing fits")
    parser.add_argument("--force-build", action="store_true", help="build even when a fitting kernel exists")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel make jobs (default: all CPUs)")
    parser.add_argument("--keep-tree", action="store_true", help="keep the build tree under kernel-test/.cache")
    args = parser.parse_args(argv)
    try:
        if not args.force_build:
            choice, reasons = select_kernel(args.fragment, shared_dir=args.shared)
            for reason in reasons:
                print(f"build-kernel: passed over {reason}", file=sys.stderr)
            if choice is not None:
                print(f"build-kernel: using the {choice.origin} kernel", file=sys.stderr)
                print(choice.bzimage)
                return 0
            if args.no_build:
                print("build-kernel: no fitting kernel (run without --no-build to build one)", file=sys.stderr)
                return 1
        path = build_kernel(args.fragment, jobs=args.jobs, keep_tree=args.keep_tree)
    except KernelError as exc:
        print(f"build-kernel: {exc}", file=sys.stderr)
        return 1
    print("build-kernel: built a new kernel", file=sys.stderr)
    print(path)
    return 0
