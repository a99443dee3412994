"""Launch agent (used in place of ``ssh``) for the network-namespace "hosts" of
tests/unit/test_multihost.py.

Open MPI's PRRTE starts its daemon on a remote host by running ``AGENT [options]
HOST COMMAND...`` exactly as it would run ``ssh [options] HOST COMMAND...``. This
agent skips the leading ``-`` options, looks HOST up in ``DECOMM_TEST_NETNS``
(``host=namespace,host=namespace``) and runs COMMAND (joined by spaces and given to
a shell, as ssh does) inside that network namespace, in a UTS namespace of its own
whose host name is HOST: each "host" must have its own name, or Open MPI takes
ranks on different hosts for ranks on one node and uses shared memory between them.

Use: ``mpirun --mca plm_ssh_agent "python multihost_agent.py" ...`` (or
``decomm-run --rsh-agent ...``), with ``DECOMM_TEST_NETNS`` in the environment.
"""

from __future__ import annotations

import os
import shlex
import sys

VAR = "DECOMM_TEST_NETNS"


def namespaces(raw: str) -> dict[str, str]:
    """Parse ``h1=ns1,h2=ns2`` into ``{"h1": "ns1", "h2": "ns2"}``."""
    table: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in raw.split(","))):
        host, sep, ns = item.partition("=")
        if not sep or not host or not ns:
            raise SystemExit(f"multihost_agent: {VAR} entry {item!r} is not host=namespace")
        table[host] = ns
    return table


def main(argv: list[str]) -> int:
    args = list(argv)
    while args and args[0].startswith("-"):  # ssh-style options (PRRTE may pass -x)
        args.pop(0)
    if len(args) < 2:
        print(f"multihost_agent: expected HOST COMMAND..., got {argv!r}", file=sys.stderr)
        return 255
    host, command = args[0], " ".join(args[1:])
    table = namespaces(os.environ.get(VAR, ""))
    if host not in table:
        print(f"multihost_agent: host {host!r} is not in {VAR}={os.environ.get(VAR)!r}",
              file=sys.stderr)
        return 255
    script = f"hostname {shlex.quote(host)} && {command}"
    cmd = ["ip", "netns", "exec", table[host], "unshare", "--uts", "--", "sh", "-c", script]
    os.execvp(cmd[0], cmd)
    return 255  # pragma: no cover - execvp does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
