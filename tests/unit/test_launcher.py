"""Tests for ``decomm-run`` (decomm/launcher.py): command construction and exit codes.

A fake ``mpirun`` (a small shell script) stands in for the real one, so these run
in a single process without MPI.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from decomm import launcher
from decomm._version import __version__

ROOT = Path(__file__).resolve().parent.parent.parent


def _plan(argv: list[str], *, cpus: int = 2, uid: int = 1000, env: dict | None = None,
          flavor: str = "openmpi") -> launcher.LaunchPlan:
    args = launcher.parse_args(argv)
    return launcher.build_plan(args, "/opt/mpi/bin/mpirun", flavor=flavor,
                               env=env if env is not None else {}, cpu_count=cpus, uid=uid)


def _fake_mpirun(tmp_path: Path, body: str, version: str = "mpirun (Open MPI) 5.0.11") -> Path:
    script = tmp_path / "mpirun"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then echo "{version}"; exit 0; fi\n'
        f'echo "$@" > "{tmp_path}/args.txt"\n'
        f"{body}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


# ----------------------------------------------------------------------------- construction


def test_plain_run_is_minimal() -> None:
    plan = _plan(["-np", "2", "python", "train.py", "--epochs", "3"], cpus=4)
    assert plan.argv == ["/opt/mpi/bin/mpirun", "-x", "OMPI_MCA_osc=^ucx",
                         "-np", "2", "python", "train.py", "--epochs", "3"]
    assert not plan.oversubscribed


def test_oversubscribed_adds_flags_and_single_thread_env() -> None:
    plan = _plan(["-np", "25", "python", "train.py"], cpus=2)
    argv = plan.argv
    assert plan.oversubscribed
    assert "--oversubscribe" in argv
    i = argv.index("--bind-to")
    assert argv[i + 1] == "none"
    for var in launcher.THREAD_VARS:
        assert f"{var}=1" in argv
        assert argv[argv.index(f"{var}=1") - 1] == "-x"
    # mpirun options come before the program; the program comes last, untouched
    assert argv[-4:] == ["-np", "25", "python", "train.py"]


def test_exact_fit_is_not_oversubscribed() -> None:
    plan = _plan(["-np", "2", "python", "t.py"], cpus=2)
    assert "--oversubscribe" not in plan.argv
    assert not any(a.startswith(launcher.THREAD_VARS) for a in plan.argv)


def test_user_thread_setting_is_kept() -> None:
    plan = _plan(["-np", "8", "python", "t.py"], cpus=2, env={"OMP_NUM_THREADS": "4"})
    assert "OMP_NUM_THREADS=1" not in plan.argv
    assert "MKL_NUM_THREADS=1" in plan.argv


def test_root_gets_allow_run_as_root() -> None:
    assert "--allow-run-as-root" in _plan(["-np", "1", "true"], uid=0, cpus=4).argv
    assert "--allow-run-as-root" not in _plan(["-np", "1", "true"], uid=1000, cpus=4).argv
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1"}
    assert "--allow-run-as-root" in _plan(["-np", "1", "true"], uid=1000, env=env).argv


def test_hostfile_disables_local_oversubscription_guess(tmp_path: Path) -> None:
    plan = _plan(["-np", "64", "--hostfile", "hosts.txt", "python", "t.py"], cpus=2)
    assert "--oversubscribe" not in plan.argv
    assert plan.argv[plan.argv.index("--hostfile") + 1] == "hosts.txt"
    forced = _plan(["-np", "64", "-H", "a:32,b:32", "--oversubscribe", "python", "t.py"])
    assert "--oversubscribe" in forced.argv and "a:32,b:32" in forced.argv


def test_exports_and_extra_args() -> None:
    plan = _plan(["-np", "2", "-x", "FOO=bar baz", "-x", "HOME_DIR", "--mpi-args",
                  "--tag-output --mca btl self,tcp", "python", "t.py"], cpus=4,
                 env={"HOME_DIR": "/h"})
    argv = plan.argv
    assert argv[argv.index("FOO=bar baz") - 1] == "-x"
    assert "HOME_DIR" in argv  # Open MPI reads the value from the environment itself
    assert argv[argv.index("--mca") + 1 : argv.index("--mca") + 3] == ["btl", "self,tcp"]
    assert "--tag-output" in argv
    # the printed line round-trips through the shell
    import shlex
    assert shlex.split(plan.shell_line()) == argv


def test_mpich_flavor_uses_genv_and_no_openmpi_flags() -> None:
    plan = _plan(["-np", "8", "-x", "A=1", "python", "t.py"], cpus=2, uid=0, flavor="mpich")
    argv = plan.argv
    assert "--allow-run-as-root" not in argv and "--oversubscribe" not in argv
    i = argv.index("-genv")
    assert argv[i : i + 3] == ["-genv", "OMP_NUM_THREADS", "1"]
    assert ["-genv", "A", "1"] == argv[argv.index("A") - 1 : argv.index("A") + 2]


def test_double_dash_separator_and_program_flags_untouched() -> None:
    plan = _plan(["-np", "2", "--", "python", "-u", "t.py", "-x", "--dry-run"], cpus=4)
    assert plan.argv[-5:] == ["python", "-u", "t.py", "-x", "--dry-run"]


@pytest.mark.parametrize("argv, message", [
    ([], "no command"),
    (["-np", "2"], "no command"),
    (["-np", "0", "python"], ">= 1"),
    (["-np", "2", "-x", "1BAD=2", "python"], "VAR"),
])
def test_bad_arguments(argv: list[str], message: str) -> None:
    with pytest.raises(launcher.LauncherError, match=message):
        _plan(argv)


# ----------------------------------------------------------------------------- multi-host

AGENT = "ssh -p 2222 -o StrictHostKeyChecking=no"


def test_hosts_and_rsh_agent_openmpi5() -> None:
    """-H, --hostfile and --rsh-agent: Open MPI 5 (PRRTE) spells the agent plm_ssh_agent;
    the agent stays one argument (spaces and all), before the program."""
    plan = _plan(["-np", "4", "-H", "h1:2,h2:2", "--rsh-agent", AGENT, "python", "t.py"],
                 cpus=2, uid=0)
    assert plan.argv == ["/opt/mpi/bin/mpirun", "--allow-run-as-root", "--host", "h1:2,h2:2",
                         "--mca", "plm_ssh_agent", AGENT, "-np", "4", "python", "t.py"]
    # across machines osc/ucx may be the fast one-sided path: left to the user
    assert not plan.oversubscribed  # 4 ranks on 2 local CPUs, but the slots are remote
    import shlex
    assert shlex.split(plan.shell_line()) == plan.argv
    hf = _plan(["-np", "4", "--hostfile", "hosts", "--rsh-agent", "/x/agent", "python", "t.py"])
    i = hf.argv.index("--hostfile")
    assert hf.argv[i : i + 5] == ["--hostfile", "hosts", "--mca", "plm_ssh_agent", "/x/agent"]
    assert not any("not used" in note for note in hf.notes)


def test_rsh_agent_openmpi4_and_mpich() -> None:
    args = launcher.parse_args(["-np", "2", "-H", "a,b", "--rsh-agent", AGENT, "python", "t.py"])
    old = launcher.build_plan(args, "/m/mpirun", env={}, cpu_count=4, uid=1000, openmpi_major=4)
    assert old.argv[old.argv.index("--mca") : old.argv.index("--mca") + 3] == [
        "--mca", "plm_rsh_agent", AGENT]
    new = launcher.build_plan(args, "/m/mpirun", env={}, cpu_count=4, uid=1000, openmpi_major=5)
    assert "plm_ssh_agent" in new.argv and "plm_rsh_agent" not in new.argv
    mpich = _plan(["-np", "2", "-H", "a,b", "--rsh-agent", "/x/agent", "python", "t.py"],
                  flavor="mpich")
    i = mpich.argv.index("-launcher")
    assert mpich.argv[i : i + 4] == ["-launcher", "ssh", "-launcher-exec", "/x/agent"]
    assert "--mca" not in mpich.argv
    with pytest.raises(launcher.LauncherError, match="one executable without arguments"):
        _plan(["-np", "2", "-H", "a,b", "--rsh-agent", AGENT, "python", "t.py"], flavor="mpich")


@pytest.mark.parametrize("argv, message", [
    (["-np", "2", "-H", "a,b", "--rsh-agent", " ", "python"], "--rsh-agent: empty"),
    (["-np", "2", "-H", "a,b", "--rsh-agent", "ssh", "--mpi-args", "--mca plm_ssh_agent rsh",
      "python"], "both set the launch agent"),
    (["-np", "2", "-H", "a,b", "--rsh-agent", "ssh", "--mpi-args", "--mca plm_rsh_agent rsh",
      "python"], "plm_rsh_agent"),
])
def test_bad_rsh_agent(argv: list[str], message: str) -> None:
    with pytest.raises(launcher.LauncherError, match=message):
        _plan(argv)


def test_rsh_agent_without_hosts_says_it_is_unused() -> None:
    plan = _plan(["-np", "2", "--rsh-agent", "ssh", "python", "t.py"], cpus=4)
    assert any("agent is not used" in note for note in plan.notes)


@pytest.mark.parametrize("version, param", [
    ("mpirun (Open MPI) 5.0.11", "plm_ssh_agent"),
    ("mpirun (Open MPI) 4.1.6", "plm_rsh_agent"),
    ("mpirun (some MPI)", "plm_ssh_agent"),  # unknown version: assume a current Open MPI
])
def test_dry_run_with_hosts_and_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      version: str, param: str) -> None:
    """main(): the agent parameter follows the installed Open MPI's version."""
    fake = _fake_mpirun(tmp_path, "exit 9", version=version)
    rc = launcher.main(["--mpirun", str(fake), "--dry-run", "-np", "4", "-H", "h1:2,h2:2",
                        "--rsh-agent", "/usr/bin/ssh -p 2222", "python", "t.py"])
    assert rc == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--host h1:2,h2:2 --mca {param} '/usr/bin/ssh -p 2222' " in line, line
    assert not (tmp_path / "args.txt").exists()  # --dry-run ran nothing


def test_detect_openmpi_major(tmp_path: Path) -> None:
    cases = {"mpirun (Open MPI) 5.0.11": 5, "mpirun (Open MPI) 4.1.6": 4,
             "HYDRA build details: Version: 4.1": None}
    for i, (text, major) in enumerate(cases.items()):
        d = tmp_path / str(i)
        d.mkdir()
        assert launcher.detect_openmpi_major(str(_fake_mpirun(d, "exit 0", version=text))) \
            == major, text
    assert launcher.detect_openmpi_major(str(tmp_path / "missing")) is None


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        launcher.main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


# ----------------------------------------------------------------------------- finding mpirun


def test_find_mpirun_explicit_and_missing(tmp_path: Path) -> None:
    fake = _fake_mpirun(tmp_path, "exit 0")
    assert launcher.find_mpirun(str(fake)) == str(fake)
    with pytest.raises(launcher.LauncherError, match="not an executable"):
        launcher.find_mpirun(str(tmp_path / "nope"))
    with pytest.raises(launcher.LauncherError, match="not found on PATH"):
        launcher.find_mpirun("definitely-not-an-mpirun", env={"PATH": str(tmp_path / "empty")})


def test_find_mpirun_clear_error_when_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(launcher.LauncherError, match="no MPI launcher found"):
        launcher.find_mpirun()
    assert launcher.main(["-np", "2", "true"]) == 2


def test_find_mpirun_prefers_interpreter_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    fake = _fake_mpirun(bindir, "exit 0")
    other = tmp_path / "other"
    other.mkdir()
    _fake_mpirun(other, "exit 0")
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", str(other))
    assert launcher.find_mpirun() == str(fake)


def test_detect_flavor(tmp_path: Path) -> None:
    ompi = _fake_mpirun(tmp_path, "exit 0")
    assert launcher.detect_flavor(str(ompi)) == "openmpi"
    mpich_dir = tmp_path / "m"
    mpich_dir.mkdir()
    mpich = _fake_mpirun(mpich_dir, "exit 0", version="HYDRA build details: Version: 4.1")
    assert launcher.detect_flavor(str(mpich)) == "mpich"
    assert launcher.detect_flavor(str(tmp_path / "missing")) == "openmpi"


# ----------------------------------------------------------------------------- running


@pytest.mark.parametrize("code", [0, 1, 3, 42])
def test_exit_code_is_forwarded(
    tmp_path: Path, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = _fake_mpirun(tmp_path, f"exit {code}")
    rc = launcher.main(["--mpirun", str(fake), "-np", "2", "python", "t.py", "--flag"])
    assert rc == code
    err = capsys.readouterr().err
    assert f"{fake}" in err and "python t.py --flag" in err  # the line it ran is printed
    args = (tmp_path / "args.txt").read_text().split()
    assert args[-5:] == ["-np", "2", "python", "t.py", "--flag"]


def test_signal_death_maps_to_128_plus_signal(tmp_path: Path) -> None:
    fake = _fake_mpirun(tmp_path, "kill -TERM $$")
    rc = launcher.main(["--mpirun", str(fake), "-np", "1", "true"])
    assert rc == 128 + signal.SIGTERM


def test_dry_run_does_not_execute(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = _fake_mpirun(tmp_path, "exit 9")
    rc = launcher.main(["--mpirun", str(fake), "--dry-run", "-np", "30", "python", "x y.py"])
    assert rc == 0
    assert not (tmp_path / "args.txt").exists()
    err = capsys.readouterr().err
    assert "'x y.py'" in err  # shell-quoted


def test_environment_reaches_the_program(tmp_path: Path) -> None:
    fake = _fake_mpirun(tmp_path, f'env > "{tmp_path}/env.txt"; exit 0')
    env_before = dict(os.environ)
    assert launcher.main(["--mpirun", str(fake), "-np", "1", "true"]) == 0
    assert dict(os.environ) == env_before  # the launcher does not mutate our own environment
    assert "PATH=" in (tmp_path / "env.txt").read_text()


@pytest.mark.timeout(60)
def test_real_mpirun_forwards_exit_code() -> None:
    """End to end with the real launcher when one is installed (skipped otherwise)."""
    try:
        real = launcher.find_mpirun()
    except launcher.LauncherError:
        pytest.skip("no mpirun installed")
    rc = launcher.main(["--mpirun", real, "-np", "2", "--oversubscribe",
                        sys.executable, "-c", "import sys; sys.exit(7)"])
    assert rc == 7


# ----------------------------------------------------------------------------- one-sided components


def test_osc_ucx_is_excluded_unless_the_user_chose() -> None:
    argv = _plan(["-np", "2", "python", "t.py"], cpus=4).argv
    i = argv.index("OMPI_MCA_osc=^ucx")
    assert argv[i - 1] == "-x" and i < argv.index("-np")  # an mpirun option, not the program's
    chosen = [
        _plan(["-np", "2", "python", "t.py"], cpus=4, env={"OMPI_MCA_osc": "sm"}).argv,
        _plan(["-np", "2", "-x", "OMPI_MCA_osc=rdma", "python", "t.py"], cpus=4).argv,
        _plan(["-np", "2", "--mpi-args", "--mca osc sm", "python", "t.py"], cpus=4).argv,
        _plan(["-np", "2", "python", "t.py"], cpus=4, flavor="mpich").argv,  # not Open MPI
    ]
    for argv in chosen:
        assert not any(a.startswith("OMPI_MCA_osc=^") for a in argv), argv
    assert "OMPI_MCA_osc=rdma" in chosen[1]  # the user's own choice is kept


def test_dry_run_shows_osc_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMPI_MCA_osc", raising=False)
    fake = _fake_mpirun(tmp_path, "exit 9")
    assert launcher.main(["--mpirun", str(fake), "--dry-run", "-np", "2", "python", "t.py"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "-x 'OMPI_MCA_osc=^ucx' -np 2 python t.py" in line
    monkeypatch.setenv("OMPI_MCA_osc", "sm")
    assert launcher.main(["--mpirun", str(fake), "--dry-run", "-np", "2", "python", "t.py"]) == 0
    assert "OMPI_MCA_osc" not in capsys.readouterr().err.strip().splitlines()[-1]


def _real_mpirun() -> str:
    try:
        return launcher.find_mpirun()
    except launcher.LauncherError:
        pytest.skip("no mpirun installed")


def _launcher_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DECOMM_TIMELINE", "OMPI_MCA_osc")}
    env.update(PYTHONPATH=str(ROOT), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)
    return env


DECOMM_RUN = [sys.executable, "-m", "decomm.launcher"]


@pytest.mark.timeout(120)
def test_ranks_see_osc_setting(tmp_path: Path) -> None:
    """End to end: the variable reaches the ranks' environment through mpirun."""
    _real_mpirun()
    code = "import os; print('osc=' + os.environ.get('OMPI_MCA_osc', '<unset>'))"
    proc = subprocess.run([*DECOMM_RUN, "-np", "2", "--oversubscribe", sys.executable, "-c", code],
                          env=_launcher_env(), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["osc=^ucx", "osc=^ucx"]


# ----------------------------------------------------------------------------- timeline


@pytest.mark.timeout(180)
def test_timeline_under_decomm_run_keeps_every_rank_trace(tmp_path: Path) -> None:
    """DECOMM_TIMELINE=prefix with decomm-run: the launcher (which imports decomm but
    never calls init) must not overwrite rank 0's trace when it exits after the ranks."""
    _real_mpirun()
    script = tmp_path / "tiny.py"
    script.write_text(
        "import torch, decomm\n"
        "from decomm import timeline\n"
        "decomm.init()\n"
        "decomm.set_topology(decomm.topology.RingGraph(decomm.size()))\n"
        "for i in range(3):\n"
        "    decomm.neighbor_allreduce(torch.ones(4), name=f'x{i}')\n"
        "decomm.shutdown()\n"
    )
    prefix = tmp_path / "tl" / "rank"
    proc = subprocess.run([*DECOMM_RUN, "-np", "2", "--oversubscribe", sys.executable, str(script)],
                          env=_launcher_env(DECOMM_TIMELINE=str(prefix)), capture_output=True,
                          text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        doc = json.loads(Path(f"{prefix}{rank}.json").read_text())
        assert doc["otherData"]["rank"] == rank
        ops = [e for e in doc["traceEvents"] if e.get("cat") == "op"]
        assert [e["args"]["name"] for e in ops] == ["x0", "x1", "x2"]
        assert {e["pid"] for e in ops} == {rank}


# ----------------------------------------------------------------------------- signals

SLEEPER = (
    "import os, sys, time\n"
    "rank = os.environ.get('OMPI_COMM_WORLD_RANK', os.environ.get('PMI_RANK', 'x'))\n"
    "path = os.path.join(sys.argv[1], f'pid{rank}')\n"
    "open(path + '.tmp', 'w').write(str(os.getpid()))\n"
    "os.replace(path + '.tmp', path)\n"
    "time.sleep(300)\n"
)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_for_ranks(pid_dir: Path, proc: subprocess.Popen, n: int,
                    timeout: float = 90) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(pid_dir.glob("pid[0-9]*"))
        if len(files) == n:
            return [int(f.read_text()) for f in files]
        assert proc.poll() is None, "decomm-run ended before the ranks started"
        time.sleep(0.2)
    raise AssertionError(f"the {n} ranks did not start within {timeout}s")


def _assert_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if _pid_alive(p)]
    if left:
        for p in left:
            os.kill(p, signal.SIGKILL)
        raise AssertionError(f"ranks {left} still running after decomm-run exited")


def _start_sleepers(tmp_path: Path, **popen_kw: object) -> tuple[subprocess.Popen, list[int]]:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    proc = subprocess.Popen(
        [*DECOMM_RUN, "-np", "2", "--oversubscribe", sys.executable, str(script), str(pid_dir)],
        env=_launcher_env(), **popen_kw)
    try:
        return proc, _wait_for_ranks(pid_dir, proc, 2)
    except BaseException:
        proc.kill()
        raise


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_launcher_alone_stops_the_job(tmp_path: Path, sig: int) -> None:
    """``kill -INT <decomm-run pid>``: only the launcher gets the signal (own session, no
    terminal); it passes it on to mpirun, the ranks stop, the status is 128 + signal."""
    _real_mpirun()
    proc, pids = _start_sleepers(tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
    try:
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)  # the ranks would sleep for 300 s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, err.decode(errors="replace")[-2000:]
    _assert_gone(pids)


@pytest.mark.timeout(180)
def test_ctrl_c_on_the_terminal_exits_130_without_a_second_interrupt(tmp_path: Path) -> None:
    """A Ctrl-C typed on the terminal reaches the whole foreground group (launcher and
    mpirun): status 130, and mpirun is not sent a second SIGINT (Open MPI would print
    "Abort is in progress" and abort without its orderly shutdown)."""
    import fcntl
    import pty
    import termios
    import threading

    _real_mpirun()
    master, slave = pty.openpty()

    def own_terminal() -> None:  # new session whose controlling terminal is the pty
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    try:
        proc, pids = _start_sleepers(tmp_path, stdin=slave, stdout=slave, stderr=slave,
                                     preexec_fn=own_terminal)
        reader.start()
        try:
            os.write(master, termios.tcgetattr(master)[6][termios.VINTR])  # ^C
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        os.close(slave)
    reader.join(timeout=5)
    os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 130, out[-2000:]
    assert "Abort is in progress" not in out
    _assert_gone(pids)
