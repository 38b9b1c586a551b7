"""Simulated hosts for multi-host tests: network namespaces with an sshd each, built and torn
down by ``scripts/netns_hosts.sh`` (see its header for the layout).

:func:`simulated_hosts` installs the system packages if needed (``netns_hosts.sh deps``),
builds the hosts, yields a :class:`SimulatedHosts` and removes them again, also when the body
fails. It raises :class:`NetnsUnavailable` with the reason when this machine cannot build them
(not root, no network namespaces): a multi-host test must fail on that, never skip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from tests.helpers.launch import REPO

SCRIPT = REPO / "scripts" / "netns_hosts.sh"


class NetnsUnavailable(RuntimeError):
    """The simulated hosts cannot be built on this machine (the message says why)."""


@dataclasses.dataclass(frozen=True)
class SimulatedHosts:
    """Hosts built by ``netns_hosts.sh up``: host ``i`` (0-based) has ``addresses[i]``."""

    state_dir: Path
    addresses: tuple[str, ...]
    nic: str               # the interface name every host and the launcher share
    namespace_prefix: str  # host i is the network namespace f"{prefix}-{i + 1}"
    ssh_identity_file: Path
    ssh_bin_dir: Path      # holds an ``ssh`` that uses the hosts' throwaway keys
    local_dir: Path        # one path, a different (node-local) folder on every host

    def namespace(self, host: int) -> str:
        """The network namespace of host ``host``."""
        return f"{self.namespace_prefix}-{host + 1}"

    def hosts_arg(self, count: int | None = None, slots: int = 1) -> str:
        """``horovodrun -H`` value for the first ``count`` hosts (all by default)."""
        return ",".join(f"{a}:{slots}" for a in self.addresses[:count])

    def host_local_dir(self, host: int) -> Path:
        """What host ``host`` sees at :attr:`local_dir`, seen from this (the root) namespace."""
        return self.state_dir / f"host{host + 1}" / "local"

    def env(self) -> dict[str, str]:
        """Environment for a launch over the hosts: their ``ssh`` first on ``PATH``."""
        return {"PATH": f"{self.ssh_bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    def host_of(self, pid: int) -> int | None:
        """Which host process ``pid`` runs on (``None``: the root namespace or gone)."""
        out = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True,
                             text=True).stdout.strip()
        prefix = f"{self.namespace_prefix}-"
        return int(out[len(prefix):]) - 1 if out.startswith(prefix) else None

    def kill_workers(self) -> list[int]:
        """SIGKILL every process on the hosts except their sshd; the pids killed.

        Workers started over ssh are not in the launcher's process group: a test that timed
        out (or killed the launcher) leaves them running until this is called.
        """
        killed = []
        for host in range(len(self.addresses)):
            sshd = int((self.state_dir / f"host{host + 1}" / "sshd.pid").read_text())
            pids = subprocess.run(["ip", "netns", "pids", self.namespace(host)],
                                  capture_output=True, text=True).stdout.split()
            for pid in map(int, pids):
                if pid != sshd:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
        return killed


def _run_script(*args: str | Path) -> str:
    proc = subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise NetnsUnavailable(f"`bash {SCRIPT} {' '.join(map(str, args))}` failed "
                               f"(exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        values[key] = " ".join(shlex.split(value))
    return values


def require_root() -> None:
    """Raise :class:`NetnsUnavailable` unless this process can build the hosts (root)."""
    if os.geteuid() != 0:
        raise NetnsUnavailable(
            "the multi-host tests build network namespaces, a bridge and sshd servers: run them "
            f"as root (CI does). This process runs as uid {os.geteuid()}.")


@contextlib.contextmanager
def simulated_hosts(count: int) -> Iterator[SimulatedHosts]:
    """Build ``count`` simulated hosts for the duration of the ``with`` block."""
    if count < 1:
        raise ValueError(f"`count` must be a positive integer. Received: count={count}")
    require_root()
    _run_script("deps")
    with tempfile.TemporaryDirectory(prefix="dho2-hosts-") as tmp:
        state = Path(tmp) / "state"
        try:
            _run_script("up", state, count)
            values = _read_env_file(state / "hosts.env")
            hosts = SimulatedHosts(
                state_dir=state, addresses=tuple(values["HOSTS"].split()), nic=values["NIC"],
                namespace_prefix=values["NAMESPACE_PREFIX"],
                ssh_identity_file=Path(values["SSH_IDENTITY_FILE"]),
                ssh_bin_dir=Path(values["SSH_BIN_DIR"]), local_dir=Path(values["LOCAL_DIR"]))
            yield hosts
        finally:
            _run_script("down", state)
