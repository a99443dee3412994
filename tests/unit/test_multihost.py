"""One MPI job across two "hosts" made of Linux network namespaces on this machine.

The fixture builds two network namespaces joined by a veth pair (10.203.0.1 and
10.203.0.2, addresses that exist only inside them), gives each an ``/etc/hosts`` naming
both hosts ``h1`` and ``h2``, and runs every command of a host in its own UTS namespace
with that host name (with one shared host name Open MPI would take both "hosts" for one
node and use shared memory between them). ``mpirun`` starts inside ``h1`` and reaches
``h2`` through ``tests/scenarios/multihost_agent.py``, a launch agent used in place of
``ssh`` (``--mca plm_ssh_agent`` / ``decomm-run --rsh-agent``). So the job crosses a
real network device over TCP, as on two machines.

Checks: the MPI op subset and ``hierarchical_neighbor_allreduce`` with the real machine
grouping against closed forms (tests/scenarios/multihost_job.py), and a one-epoch
``decomm-run -H h1:2,h2:2 ... python examples/train.py``; the veth byte counters must
show at least the traffic that the closed forms force across the host boundary.

Needs root, ``ip`` (iproute2) and ``unshare`` (util-linux); skipped otherwise, with the
reason. Everything the fixture makes is removed afterwards, even on failure; names are
unique per run, and leftovers of a run whose process is gone are removed first.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "tests" / "scenarios"
AGENT = SCENARIOS / "multihost_agent.py"
JOB = SCENARIOS / "multihost_job.py"
MPIRUN = Path(sys.executable).parent / "mpirun"
if not MPIRUN.exists():
    MPIRUN = Path(shutil.which("mpirun") or "mpirun")

#: Namespace names are ``PREFIX<pid>-<random>-<host>``: the pid finds leftovers.
PREFIX = "decomm-mh-"
NETNS_ETC = Path("/etc/netns")
HOSTS = ("h1", "h2")
SLOTS = 2
#: Outer limits (seconds) for each job: generous for two busy cores.
JOB_LIMIT = 240


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _missing_prerequisite() -> str | None:
    """Why namespaces cannot be made here (None if they probably can)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "unshare", "sh"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (iproute2 / util-linux)"
    if not MPIRUN.exists():
        return "no mpirun"
    probe = _run(["unshare", "--uts", "--", "true"])
    if probe.returncode != 0:
        return f"`unshare --uts` fails: {probe.stderr.strip()}"
    return None


# ----------------------------------------------------------------------------- namespaces


def _pids_in(ns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", ns])
    return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []


def _remove_namespace(ns: str) -> None:
    """Kill what still runs in ``ns`` (only ever our own job's processes), delete it
    (which deletes its end of the veth pair) and its /etc/netns entry."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = _pids_in(ns)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
    _run(["ip", "netns", "delete", ns])
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers() -> None:
    """Remove namespaces (and /etc/netns entries) of earlier runs whose process is gone."""
    names = {line.split()[0] for line in _run(["ip", "netns", "list"]).stdout.splitlines()
             if line.strip()}
    if NETNS_ETC.is_dir():
        names |= {p.name for p in NETNS_ETC.iterdir()}
    for ns in sorted(n for n in names if n.startswith(PREFIX)):
        pid = ns[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove_namespace(ns)


@dataclass
class Hosts:
    """Two namespace "hosts": their namespaces, veth device names and job environment."""

    netns: dict[str, str]  # host name -> namespace
    veth: dict[str, str]  # host name -> its end of the veth pair
    env: dict[str, str]

    def command(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run on ``host``: inside its network namespace, with its host name."""
        return ["ip", "netns", "exec", self.netns[host], "unshare", "--uts", "--",
                "sh", "-c", f'hostname {host} && exec "$@"', "sh", *argv]

    def counters(self, host: str) -> tuple[int, int]:
        """(received, sent) bytes of ``host``'s veth device."""
        out = _run(["ip", "-j", "-s", "-n", self.netns[host], "link", "show", "dev",
                    self.veth[host]])
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def processes(self) -> str:
        """The command lines still running in the hosts' namespaces (for a hang report)."""
        lines = []
        for host, ns in self.netns.items():
            for pid in _pids_in(ns):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                lines.append(f"{host} {pid}: {cmd.decode(errors='replace')[:300]}")
        return "\n".join(lines) or "(none)"

    def run(self, host: str, argv: list[str], limit: float = JOB_LIMIT) -> tuple[int, str, float]:
        """Run ``argv`` on ``host`` with an outer time limit: (status, output, seconds)."""
        t0 = time.monotonic()
        try:
            proc = subprocess.run(self.command(host, argv), capture_output=True, text=True,
                                  timeout=limit, env=self.env, cwd=ROOT, check=False)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"") + (exc.stderr or b"")
            text = out.decode(errors="replace") if isinstance(out, bytes) else out
            pytest.fail(f"job on {host} still running after {limit} s:\n{text[-4000:]}\n"
                        f"processes left in the namespaces:\n{self.processes()}")
        return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def _build(tag: str, made: list[str]) -> Hosts:
    netns = {h: f"{tag}-{h}" for h in HOSTS}
    short = tag.rsplit("-", 1)[1]  # interface names must stay within 15 characters
    veth = {h: f"mh{short}{i}" for i, h in enumerate(HOSTS)}
    addr = {h: f"10.203.0.{i + 1}" for i, h in enumerate(HOSTS)}

    def ip(*args: str) -> None:
        out = _run(["ip", *args])
        if out.returncode != 0:
            raise RuntimeError(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")

    for h in HOSTS:
        made.append(netns[h])  # before creating it, so that a half-made one is removed
        ip("netns", "add", netns[h])
    a, b = HOSTS
    ip("link", "add", veth[a], "netns", netns[a], "type", "veth",
       "peer", "name", veth[b], "netns", netns[b])
    hosts_file = "127.0.0.1 localhost\n" + "".join(f"{addr[h]} {h}\n" for h in HOSTS)
    for h in HOSTS:
        ip("-n", netns[h], "addr", "add", f"{addr[h]}/24", "dev", veth[h])
        ip("-n", netns[h], "link", "set", "lo", "up")
        ip("-n", netns[h], "link", "set", veth[h], "up")
        (NETNS_ETC / netns[h]).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / netns[h] / "hosts").write_text(hosts_file)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_MCA_", "PRTE_MCA_", "PMIX_MCA_", "DECOMM_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), DECOMM_TIMEOUT="60",
               DECOMM_TEST_NETNS=",".join(f"{h}={netns[h]}" for h in HOSTS))
    return Hosts(netns=netns, veth=veth, env=env)


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    reason = _missing_prerequisite()
    if reason:
        pytest.skip(f"multi-host test: {reason}")
    _remove_leftovers()
    tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    made: list[str] = []
    had_etc = NETNS_ETC.exists()
    try:
        try:
            built = _build(tag, made)
        except (RuntimeError, OSError) as exc:
            pytest.skip(f"multi-host test: cannot build network namespaces here: {exc}")
        yield built
    finally:
        for ns in made:
            _remove_namespace(ns)
        if not had_etc:
            try:
                NETNS_ETC.rmdir()  # only if empty: another run may be using it
            except OSError:
                pass
        left = [ns for ns in made if ns in _run(["ip", "netns", "list"]).stdout]
        assert not left, f"namespaces {left} could not be removed"


# ----------------------------------------------------------------------------- tests

AGENT_CMD = f"{sys.executable} {AGENT}"
MIB = 1024 * 1024


@pytest.mark.timeout(JOB_LIMIT + 60)
def test_ops_and_hierarchical_across_two_hosts(hosts: Hosts, tmp_path: Path) -> None:
    """4 ranks, 2 per host, under plain mpirun with a hostfile and the agent: every rank
    passes the closed-form checks of multihost_job.py, and each direction of the veth
    carried at least the 2 x 2 MiB that the two 2 MiB allreduces force across it (a host
    cannot know the other host's 2 MiB partial sum without receiving it)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h} slots={SLOTS}\n" for h in HOSTS))
    before = hosts.counters("h1")
    n = SLOTS * len(HOSTS)
    rc, out, seconds = hosts.run("h1", [
        str(MPIRUN), "--hostfile", str(hostfile), "--mca", "plm_ssh_agent", AGENT_CMD,
        "-x", "OMPI_MCA_osc=^ucx", "-np", str(n), sys.executable, str(JOB), str(len(HOSTS))])
    after = hosts.counters("h1")
    assert rc == 0, out[-6000:]
    ok = sorted(line.split(" ", 2)[2] for line in out.splitlines()
                if line.startswith("multihost ok "))
    assert ok == [f"rank={r} host={HOSTS[r // SLOTS]} node_rank={r % SLOTS} "
                  f"machine={r // SLOTS}" for r in range(n)], out[-6000:]
    received, sent = after[0] - before[0], after[1] - before[1]
    assert received >= 2 * 2 * MIB and sent >= 2 * 2 * MIB, (received, sent, out[-3000:])
    print(f"ops job: {seconds:.1f} s, veth of h1: {received} B in, {sent} B out")


@pytest.mark.timeout(JOB_LIMIT + 60)
def test_decomm_run_trains_across_two_hosts(hosts: Hosts, tmp_path: Path) -> None:
    """``decomm-run -H h1:2,h2:2 --rsh-agent AGENT python examples/train.py``: one epoch
    on the digits set ends with status 0 and rank 0's CSV. Over a ring of 4 ranks placed
    2 per host, every rank has one neighbour on each host and neighbor_allreduce sends the
    same bytes to both, so each direction of the veth carries at least half of what the
    two ranks of the other host sent: bytes_sent_per_rank of the CSV."""
    out_dir = tmp_path / "run"
    before = hosts.counters("h1")
    rc, out, seconds = hosts.run("h1", [
        sys.executable, "-m", "decomm.launcher", "-np", str(SLOTS * len(HOSTS)),
        "-H", ",".join(f"{h}:{SLOTS}" for h in HOSTS), "--rsh-agent", AGENT_CMD,
        "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", sys.executable, "examples/train.py",
        "--epochs", "1", "--topology", "ring", "--no-plot", "--out", str(out_dir)])
    after = hosts.counters("h1")
    assert rc == 0, out[-6000:]
    assert "--mca plm_ssh_agent" in out  # the printed mpirun line
    rows = [row for f in out_dir.glob("*.csv") for row in csv.DictReader(f.open())]
    assert len(rows) == 1, (rows, out[-3000:])
    row = rows[0]
    assert float(row["test_acc_avg"]) > 0.3, row  # chance is 0.1
    per_rank = float(row["bytes_sent_per_rank"])
    received, sent = after[0] - before[0], after[1] - before[1]
    assert per_rank > 0 and received >= per_rank and sent >= per_rank, (
        per_rank, received, sent)
    print(f"train job: {seconds:.1f} s, {per_rank:.0f} B sent per rank, veth of h1: "
          f"{received} B in, {sent} B out")


# ----------------------------------------------------------------------------- the agent


def test_agent_runs_the_command_in_the_hosts_namespace(tmp_path: Path) -> None:
    """The agent (no root needed: a fake ``ip`` records its arguments) skips ssh-style
    options, maps the host to its namespace and hands the joined command to a shell
    after setting the host name; an unknown host is refused with status 255."""
    fake = tmp_path / "ip"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {tmp_path}/argv\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}",
               DECOMM_TEST_NETNS="h1=ns-a, h2=ns-b")
    proc = subprocess.run([sys.executable, str(AGENT), "-x", "-o", "h2", "PATH=/p", ";",
                           "export", "PATH", ";", "/bin/prted", "--x", "1"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "argv").read_text().splitlines() == [
        "netns", "exec", "ns-b", "unshare", "--uts", "--", "sh", "-c",
        "hostname h2 && PATH=/p ; export PATH ; /bin/prted --x 1"]
    bad = subprocess.run([sys.executable, str(AGENT), "h3", "true"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 255 and "'h3' is not in DECOMM_TEST_NETNS" in bad.stderr
