"""run-vm: run one command inside a throwaway VM that has an fscache-capable kernel.

    kernel-test/run-vm [--kernel PATH] [--mem MB] [--timeout S] [--scratch-size SIZE] [--accel MODE] [--net]
                       [--verbose] -- CMD [ARGS...]

The guest's root is the host's ``/``, shared read-only over 9p, so every host path is where it is (the checkout,
its virtualenv, the host's ``/tmp``). The guest mounts its own ``/proc``, ``/sys``, ``/dev`` (with ``/dev/shm``,
``/dev/pts``) and a tmpfs on ``/run``; those host folders are hidden in the guest, so the caller's working
directory must not be under them. A fresh sparse ext4 disk (deleted afterwards) is mounted at
``/run/vm-scratch``. CMD runs as root in the caller's working directory with the caller's environment plus:

    NYDUS_EROFS_IN_VM=1     you are in the VM
    VM_SCRATCH=/run/vm-scratch   the writable ext4 scratch folder (everything else is read-only)
    TMPDIR=$VM_SCRATCH/tmp  so tempfile and pytest's tmp_path work
    PYTHONDONTWRITEBYTECODE=1
    VM_HOST=10.0.2.2        with --net only: the host's 127.0.0.1 as the guest reaches it

With ``--net`` the guest has a qemu user-mode (slirp) virtio NIC, 10.0.2.15/24 with the default route via
10.0.2.2, which slirp maps to the host's loopback: a server the host runs on 127.0.0.1:PORT is VM_HOST:PORT.

CMD's stdout and stderr reach run-vm's stdout and stderr live, over two virtio serial ports; the kernel log goes
to a third channel (shown with ``--verbose``, and its tail on failure). run-vm exits with CMD's status; 124 when
the timeout expired (qemu is killed); 125 when the VM failed (qemu error, kernel panic, init failure); 2 for
usage errors.

Stdlib only, so it runs before the project's virtualenv exists.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import debkernel
import vmkernel

HERE = Path(__file__).resolve().parent
INIT = HERE / "vm-init"
GUEST_SCRATCH = "/run/vm-scratch"
HOST_FROM_GUEST = "10.0.2.2"  # slirp's gateway: the host's 127.0.0.1 (vm-init configures 10.0.2.15/24 via it)
HIDDEN_IN_GUEST = ("/proc", "/sys", "/dev", "/run")
PORT_PREFIX = "org.nydus-erofs."
CHANNELS = ("console", "stdout", "stderr", "status")

EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_VM_FAILED = 125

DEFAULT_MEM_MB = 1024
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_SCRATCH = "2G"
POWEROFF_GRACE_S = 20.0
CONSOLE_TAIL_BYTES = 8192
KVM_PROBE_TIMEOUT_S = 10.0


class RunVmError(Exception):
    """A setup problem reported as one line (exit 125, or 2 for usage)."""

    def __init__(self, message: str, code: int = EXIT_VM_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Options:
    command: list[str]
    kernel: Path | None = None
    mem_mb: int = DEFAULT_MEM_MB
    timeout_s: float = DEFAULT_TIMEOUT_S
    scratch_bytes: int = 2 << 30
    accel: str = "auto"
    net: bool = False
    verbose: bool = False
    cwd: Path = field(default_factory=Path.cwd)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


def parse_size(text: str) -> int:
    """``2G``, ``512M``, ``100k`` or plain bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"bad size {text!r} (use e.g. 2G, 512M)")
    shift = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]
    return int(m.group(1)) << shift


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="run-vm",
        usage="run-vm [--kernel PATH] [--mem MB] [--timeout S] [--scratch-size SIZE] [--accel MODE] [--net] "
              "[--verbose] -- CMD [ARGS...]",
        description="Run CMD in a throwaway qemu VM whose kernel has fscache on-demand (cachefiles), EROFS and "
                    "fanotify; the host root is the guest's read-only root, a fresh ext4 disk is at $VM_SCRATCH. "
                    "Exits with CMD's status, 124 on timeout, 125 when the VM failed.",
    )
    parser.add_argument("--kernel", type=Path, metavar="PATH",
                        help=f"bzImage to boot, or {debkernel.NAME!r}: Debian 12's stock kernel with an initramfs "
                             f"of the modules the guest needs (default: ${vmkernel.ENV_KERNEL}, else the shared or "
                             "cached kernel that fits kernel-test/fragment.config)")
    parser.add_argument("--mem", type=int, default=DEFAULT_MEM_MB, metavar="MB",
                        help="guest memory (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help="kill the VM after S seconds, boot included (default: %(default)s)")
    parser.add_argument("--scratch-size", default=DEFAULT_SCRATCH, metavar="SIZE",
                        help="size of the sparse ext4 scratch disk (default: %(default)s)")
    parser.add_argument("--accel", choices=("auto", "tcg", "kvm"),
                        default=os.environ.get("NYDUS_EROFS_VM_ACCEL", "auto"),
                        help="auto: KVM only when a (cached) probe boot shows it works, else TCG "
                             "(default: $NYDUS_EROFS_VM_ACCEL or auto)")
    parser.add_argument("--net", action="store_true",
                        help=f"give the guest a user-mode NIC: the host's 127.0.0.1 is {HOST_FROM_GUEST} there "
                             "($VM_HOST)")
    parser.add_argument("-v", "--verbose", action="store_true", help="stream the kernel log to stderr")
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        own, command = argv[:cut], argv[cut + 1:]
    else:
        own, command = argv, []
    args = parser.parse_args(own)
    if not command:
        parser.error("no command: put it after --, e.g. run-vm -- sh -c 'echo hi'")
    if args.mem < 128:
        parser.error("--mem: at least 128 MB")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        scratch = parse_size(args.scratch_size)
    except ValueError as exc:
        parser.error(f"--scratch-size: {exc}")
    if scratch < 16 << 20:
        parser.error("--scratch-size: at least 16M")
    return Options(command=command, kernel=args.kernel, mem_mb=args.mem, timeout_s=args.timeout,
                   scratch_bytes=scratch, accel=args.accel, net=args.net, verbose=args.verbose)


def guest_env(env: Mapping[str, str], net: bool = False) -> dict[str, str]:
    """The caller's environment as CMD sees it in the guest."""
    out = {k: v for k, v in env.items() if k != "VM_HOST"}
    out.update(NYDUS_EROFS_IN_VM="1", VM_SCRATCH=GUEST_SCRATCH, TMPDIR=f"{GUEST_SCRATCH}/tmp",
               PYTHONDONTWRITEBYTECODE="1")
    if net:
        out["VM_HOST"] = HOST_FROM_GUEST
    return out


def job_script(command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    """The shell script the guest init runs: cd, then exec CMD with exactly ``env`` (every word quoted)."""
    if "=" in command[0]:
        raise RunVmError(f"command name {command[0]!r} contains '=': run it through sh -c", EXIT_USAGE)
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()) if k and "=" not in k)
    words = " ".join(shlex.quote(word) for word in command)
    return (
        "# written by kernel-test/run-vm; run by kernel-test/vm-init in the guest\n"
        f"cd -- {shlex.quote(str(cwd))} || exit 125\n"
        f"exec env -i {assignments} {words}\n"
    )


def hidden_in_guest(path: Path) -> str | None:
    """The guest mount that hides ``path``, if any."""
    for top in HIDDEN_IN_GUEST:
        if path == Path(top) or Path(top) in path.parents:
            return top
    return None


def _job_parent() -> Path:
    """A host folder for the job files that the guest sees through the 9p root."""
    for candidate in (Path(tempfile.gettempdir()), Path("/var/tmp"), Path("/tmp")):
        if candidate.is_dir() and hidden_in_guest(candidate.resolve()) is None and os.access(candidate, os.W_OK):
            return candidate.resolve()
    raise RunVmError("no writable temp folder visible in the guest (TMPDIR under /run, /dev, /proc or /sys?)")


def make_scratch(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    mkfs = shutil.which("mkfs.ext4", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if mkfs is None:
        raise RunVmError("mkfs.ext4 not found: install e2fsprogs")
    done = subprocess.run([mkfs, "-q", "-F", "-m", "0", "-L", "vm-scratch", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RunVmError(f"mkfs.ext4 {path} failed: {done.stderr.strip()}")


def find_qemu() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise RunVmError("qemu-system-x86_64 not found: install qemu-system-x86 (apt)")
    return qemu


def find_kernel(explicit: Path | None) -> Path:
    return find_boot(explicit)[0]


def find_boot(explicit: Path | None) -> tuple[Path, Path | None]:
    """The bzImage to boot and its initramfs (None: a kernel with everything built in).

    ``explicit`` (``--kernel``), else ``$NYDUS_EROFS_KERNEL``: a bzImage path or ``debian-6.1`` (Debian 12's
    kernel, see debkernel.py); else the shared or cached kernel that fits kernel-test/fragment.config."""
    if explicit is None and os.environ.get(vmkernel.ENV_KERNEL) == debkernel.NAME:
        explicit = Path(debkernel.NAME)
    if explicit is not None and str(explicit) == debkernel.NAME:
        try:
            deb = debkernel.prepare()
        except debkernel.DebianKernelError as exc:
            raise RunVmError(f"--kernel {debkernel.NAME}: {exc}") from exc
        return deb.bzimage, deb.initramfs
    if explicit is not None:
        if not explicit.is_file():
            raise RunVmError(f"--kernel {explicit}: no such file", EXIT_USAGE)
        return explicit.resolve(), None
    try:
        choice, reasons = vmkernel.select_kernel()
    except vmkernel.KernelError as exc:
        raise RunVmError(str(exc)) from exc
    if choice is None:
        raise RunVmError("no kernel fits kernel-test/fragment.config (" + "; ".join(reasons)
                         + "): run kernel-test/build-kernel")
    return choice.bzimage, None


def missing_prerequisites() -> str | None:
    """Why run-vm cannot boot here (no qemu, no fitting kernel, no mkfs.ext4), or None when it can."""
    try:
        find_qemu()
        find_kernel(None)
    except RunVmError as exc:
        return str(exc)
    if shutil.which("mkfs.ext4", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])) is None:
        return "mkfs.ext4 not found: install e2fsprogs"
    return None


def _set_pdeathsig() -> None:
    """In the child: die with run-vm, so a killed caller never leaves qemu behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def kvm_usable(qemu: str, kernel: Path) -> bool:
    """Probe (once per host kernel, qemu and guest kernel; cached) whether KVM boots a guest."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    st_q, st_k = os.stat(qemu), kernel.stat()
    key = hashlib.sha256(json.dumps([os.uname().release, qemu, st_q.st_mtime_ns, str(kernel), st_k.st_size,
                                     st_k.st_mtime_ns]).encode()).hexdigest()[:16]
    cache = vmkernel.CACHE_ROOT / f"kvm-probe-{key}.json"
    try:
        return bool(json.loads(cache.read_text())["kvm"])
    except (OSError, ValueError, KeyError):
        pass
    # No root file system: a working kernel panics at once and -no-reboot ends qemu. A broken KVM hangs.
    cmd = [qemu, "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults", "-no-user-config",
           "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(kernel),
           "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"]
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=KVM_PROBE_TIMEOUT_S,
                              preexec_fn=_set_pdeathsig)
        ok = b"Kernel panic" in done.stdout
    except subprocess.TimeoutExpired:
        ok = False
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"kvm": ok}))
    except OSError:
        pass
    return ok


def choose_accel(mode: str, qemu: str, kernel: Path) -> list[str]:
    if mode == "kvm" or (mode == "auto" and kvm_usable(qemu, kernel)):
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def qemu_command(qemu: str, kernel: Path, opts: Options, accel: list[str], scratch: Path, job_dir: Path,
                 sockets: Mapping[str, Path], initrd: Path | None = None) -> list[str]:
    for path in (INIT, job_dir):
        if re.search(r"[\s\"']", str(path)):
            raise RunVmError(f"{path}: a path on the kernel command line cannot contain blanks or quotes")
    append = " ".join([
        "console=ttyS0", "quiet", "panic=-1", "oops=panic",
        "rootfstype=9p", "root=root", "rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose", "ro",
        f"init={INIT}", "--", str(job_dir),
    ])
    cmd = [
        qemu, *accel, "-smp", "2", "-m", str(opts.mem_mb),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(kernel), *(["-initrd", str(initrd)] if initrd is not None else []), "-append", append,
        "-virtfs", "local,path=/,mount_tag=root,security_model=none,readonly=on,multidevs=remap",
        "-drive", f"file={scratch},format=raw,if=none,id=scratch,cache=unsafe,aio=threads",
        "-device", "virtio-blk-pci,drive=scratch",
        "-chardev", f"socket,id=console,path={sockets['console']}",
        "-serial", "chardev:console",
        "-device", "virtio-serial-pci,id=vser",
    ]
    for nr, name in enumerate(("stdout", "stderr", "status"), start=1):
        cmd += ["-chardev", f"socket,id={name},path={sockets[name]}",
                "-device", f"virtserialport,bus=vser.0,nr={nr},chardev={name},name={PORT_PREFIX}{name}"]
    if opts.net:
        # slirp's defaults: guest 10.0.2.15, gateway (the host's loopback) 10.0.2.2; vm-init sets the address
        # up statically (no DHCP wait). No option ROM: the guest boots with -kernel, never from the network.
        cmd += ["-netdev", "user,id=net0,ipv6=off", "-device", "virtio-net-pci,netdev=net0,romfile="]
    return cmd


def _write(stream: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(stream, data):]
    except BrokenPipeError:
        pass


@dataclass
class Outcome:
    status: int | None = None
    init_error: str | None = None
    timed_out: bool = False
    console: bytearray = field(default_factory=bytearray)
    qemu_log: bytearray = field(default_factory=bytearray)
    qemu_rc: int | None = None


def _relay(proc: subprocess.Popen[bytes], listeners: Mapping[str, socket.socket], opts: Options,
           started: float) -> Outcome:
    """Pump the VM's channels to our stdout/stderr until qemu exits or the time is up."""
    out = Outcome()
    status_buf = bytearray()
    sel = selectors.DefaultSelector()
    for name, lsock in listeners.items():
        sel.register(lsock, selectors.EVENT_READ, ("listen", name))
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    sel.register(proc.stdout, selectors.EVENT_READ, ("qemu", "qemu"))
    deadline = started + opts.timeout_s
    qemu_open = True
    while qemu_open:
        now = time.monotonic()
        if now >= deadline:
            if out.status is None:
                out.timed_out = True
            break
        for key, _ in sel.select(timeout=deadline - now):
            kind, name = key.data
            if kind == "listen":
                conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, ("conn", name))
                continue
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(key.fileobj)
                if kind == "qemu":
                    qemu_open = False
                else:
                    key.fileobj.close()  # type: ignore[union-attr]
                continue
            if name == "stdout":
                _write(sys.stdout.fileno(), data)
            elif name == "stderr":
                _write(sys.stderr.fileno(), data)
            elif name == "console":
                out.console += data
                del out.console[:-CONSOLE_TAIL_BYTES]
                if opts.verbose:
                    _write(sys.stderr.fileno(), data)
            elif name == "qemu":
                out.qemu_log += data
            else:
                status_buf += data
                for line in bytes(status_buf).decode(errors="replace").splitlines():
                    if m := re.fullmatch(r"exit (\d+)", line.strip()):
                        out.status = int(m.group(1))
                    elif line.startswith("init-error "):
                        out.init_error = line[len("init-error "):]
                if out.status is not None or out.init_error is not None:
                    # The guest powers off now; don't wait the whole timeout if it doesn't.
                    deadline = min(deadline, time.monotonic() + POWEROFF_GRACE_S)
    if qemu_open or proc.poll() is None:
        try:
            out.qemu_rc = proc.wait(timeout=0 if out.timed_out else 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out.qemu_rc = proc.wait()
    else:
        out.qemu_rc = proc.wait()
    # Drain what qemu handed to the sockets before it ended.
    for key in list(sel.get_map().values()):
        kind, name = key.data
        if kind == "conn":
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            sock.setblocking(True)
            sock.settimeout(1.0)
            try:
                while chunk := sock.recv(65536):
                    if name == "stdout":
                        _write(sys.stdout.fileno(), chunk)
                    elif name == "stderr":
                        _write(sys.stderr.fileno(), chunk)
                    elif name == "console":
                        out.console += chunk
                        if opts.verbose:
                            _write(sys.stderr.fileno(), chunk)
            except OSError:
                pass
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    return out


def _report(message: str, out: Outcome) -> None:
    lines = [f"run-vm: {message}"]
    console = bytes(out.console[-CONSOLE_TAIL_BYTES:]).decode(errors="replace").strip()
    if console:
        lines.append("run-vm: --- kernel console (tail) ---")
        lines.append(console)
    qlog = bytes(out.qemu_log).decode(errors="replace").strip()
    if qlog:
        lines.append("run-vm: --- qemu ---")
        lines.append(qlog)
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


def run(opts: Options) -> int:
    cwd = opts.cwd.resolve()
    if (top := hidden_in_guest(cwd)) is not None:
        raise RunVmError(f"the working directory {cwd} is under {top}, which the guest mounts over", EXIT_USAGE)
    qemu = find_qemu()
    kernel, initrd = find_boot(opts.kernel)
    accel = choose_accel(opts.accel, qemu, kernel)
    with tempfile.TemporaryDirectory(prefix="run-vm-", dir=_job_parent()) as tmp:
        job_dir = Path(tmp)
        job_dir.chmod(0o755)
        (job_dir / "job.sh").write_text(job_script(opts.command, cwd, guest_env(opts.env, opts.net)))
        scratch = job_dir / "scratch.img"
        make_scratch(scratch, opts.scratch_bytes)
        sockets = {name: job_dir / f"{name}.sock" for name in CHANNELS}
        listeners: dict[str, socket.socket] = {}
        proc: subprocess.Popen[bytes] | None = None
        try:
            for name, path in sockets.items():
                lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                lsock.bind(str(path))
                lsock.listen(1)
                lsock.setblocking(False)
                listeners[name] = lsock
            cmd = qemu_command(qemu, kernel, opts, accel, scratch, job_dir, sockets, initrd)
            if opts.verbose:
                print("run-vm: $ " + shlex.join(cmd), file=sys.stderr, flush=True)
            started = time.monotonic()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, preexec_fn=_set_pdeathsig)
            out = _relay(proc, listeners, opts, started)
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            for lsock in listeners.values():
                lsock.close()
        elapsed = time.monotonic() - started
        if opts.verbose:
            print(f"run-vm: VM ran {elapsed:.1f} s", file=sys.stderr, flush=True)
    if out.timed_out:
        _report(f"timed out after {opts.timeout_s:g} s; killed the VM ({' '.join(opts.command)})", out)
        return EXIT_TIMEOUT
    if out.init_error is not None:
        _report(f"guest init failed: {out.init_error}", out)
        return EXIT_VM_FAILED
    if out.status is None:
        why = "kernel panic" if b"Kernel panic" in out.console else f"qemu exited {out.qemu_rc}"
        _report(f"the VM ended before CMD reported an exit status ({why})", out)
        return EXIT_VM_FAILED
    return out.status


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
        return run(opts)
    except RunVmError as exc:
        print(f"run-vm: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("run-vm: interrupted", file=sys.stderr)
        return 130
