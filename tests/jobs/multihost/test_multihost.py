"""Jobs over two hosts reached by ssh: network namespaces on this machine, each with its own
address, host name, sshd and node-local folder (``tests/helpers/netns_hosts.py``).

* ``jobs/examples/multi_host.sh`` over the two hosts (one rank each) writes the same checkpoint
  as over ``localhost:2``;
* an elastic job with one worker per host survives the SIGKILL of one host's worker: that host
  is dropped and the other finishes, with the weights of a one-process replay;
* ``--resume`` from node-local checkpoint folders, where the host of rank 0 sees a checkpoint
  and the other none, stops on every rank within seconds with a ``RunConsistencyError`` (printed
  by ``jobs/train.py`` as "Ranks disagree on the checkpoint ...").

Needs root (CI runs as root); fails with the reason when the hosts cannot be built.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.launch import REPO, finish, horovodrun_path, run_horovod, start_horovod
from tests.helpers.netns_hosts import SimulatedHosts
from tests.helpers.elastic import (DISCOVERY, SCRIPT, SIGKILL_EPOCHS, STEP_DELAY,
                                   assert_recovered_and_matches_replay, kill_plan, results_of,
                                   sigkill_after_commit)
from tests.helpers.job_output import result_line

pytestmark = [pytest.mark.parallel, pytest.mark.slow]

JOB = REPO / "jobs" / "train.py"
MULTI_HOST = REPO / "jobs" / "examples" / "multi_host.sh"
# Overrides of multi_host.sh's example run: 2 epochs of 8 steps, three curvature refreshes.
SHORT = ("--epochs", "2", "--num-samples", "1000", "--k", "2", "--refresh-every", "5",
         "--warmup", "2", "--curvature-batch", "64", "--mode", "sharded")


def run_multi_host_sh(hosts: str, args: tuple[str, ...], env: dict[str, str] | None = None):
    """``HOSTS=hosts bash jobs/examples/multi_host.sh *args`` with this venv, to the end."""
    venv = Path(horovodrun_path()).parent
    return run_horovod(None, None, timeout=300, command=["bash", str(MULTI_HOST), *args], env={
        "HOSTS": hosts, "PY": str(venv / "python"), "HVDRUN": str(venv / "horovodrun"),
        **(env or {})})


def checkpoint_arrays(directory: Path) -> dict[str, np.ndarray]:
    """Every array of the checkpoint ``directory``'s manifest names, keyed ``file/array``."""
    folder = directory / json.loads((directory / "checkpoint.json").read_text())["name"]
    arrays = {}
    for npz in sorted(folder.glob("*.npz")):
        with np.load(npz) as data:
            arrays.update({f"{npz.name}/{key}": data[key] for key in data.files})
    return arrays


def sessions_from_launcher(hosts: SimulatedHosts, host: int) -> int:
    """How many ssh logins host ``host``'s sshd accepted so far."""
    log = (hosts.state_dir / f"host{host + 1}" / "sshd.log").read_text()
    return log.count("Accepted publickey for root")


def test_multi_host_sh_over_two_hosts_trains_like_one_host(hosts: SimulatedHosts,
                                                           tmp_path: Path) -> None:
    one_dir, two_dir = tmp_path / "one_host", tmp_path / "two_hosts"
    one = run_multi_host_sh("localhost:2", (*SHORT, "--checkpoint-dir", str(one_dir)))
    logins = [sessions_from_launcher(hosts, h) for h in (0, 1)]
    two = run_multi_host_sh(hosts.hosts_arg(), (*SHORT, "--checkpoint-dir", str(two_dir)),
                            env={**hosts.env(), "SSH_IDENTITY_FILE": str(hosts.ssh_identity_file)})
    # The two-host run went through both sshds (task servers, then one rank each).
    assert all(sessions_from_launcher(hosts, h) > logins[h] for h in (0, 1))
    got, want = result_line(two), result_line(one)
    assert got["ranks"] == want["ranks"] == "2" and got["epochs"] == want["epochs"] == "2"
    for key in ("test_accuracy", "train_loss", "best_train_loss"):
        assert got[key] == want[key], (key, got, want)
    # Same weights, DHO2 state (eigenpairs, momentum, ...) and step counters, to round-off.
    one_state, two_state = checkpoint_arrays(one_dir), checkpoint_arrays(two_dir)
    assert sorted(two_state) == sorted(one_state) and len(one_state) > 10
    worst = max(float(np.max(np.abs(two_state[k] - one_state[k]), initial=0.0))
                for k in one_state)
    print(f"max |two hosts - one host| over {len(one_state)} arrays: {worst:.3g}")
    for key, expected in one_state.items():
        np.testing.assert_allclose(two_state[key], expected, rtol=1e-6, atol=1e-7, err_msg=key)


def test_elastic_job_loses_one_hosts_worker_and_the_other_host_finishes(
        hosts: SimulatedHosts, tmp_path: Path) -> None:
    pid_dir, commit_dir, after, jitter = kill_plan(tmp_path)
    proc = start_horovod(SCRIPT, None, (
        "--epochs", str(SIGKILL_EPOCHS), "--pid-dir", str(pid_dir), "--commit-dir",
        str(commit_dir), "--step-delay", str(STEP_DELAY)), horovod_args=(
        "-np", "2", "--min-np", "1", "--max-np", "2", "--host-discovery-script", str(DISCOVERY),
        "--network-interface", hosts.nic, "--elastic-timeout", "30",
        "--gloo-timeout-seconds", "20"), env={
        **hosts.env(), "DHO2_ELASTIC_HOSTS": " ".join(f"{a}:1" for a in hosts.addresses)})
    # Which host each worker runs on, read while both are alive.
    deadline = time.monotonic() + 180
    while not all((pid_dir / f"rank{r}.json").exists() for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc, 5)[0][-8000:]
        time.sleep(0.1)
    host_of = {}
    for rank in (0, 1):
        pid = json.loads((pid_dir / f"rank{rank}.json").read_text())["pid"]
        host_of[pid] = hosts.host_of(pid)
    assert sorted(host_of.values()) == [0, 1], host_of  # one worker per host
    killed = sigkill_after_commit(lambda: proc.poll() is None, pid_dir, 1, after, jitter,
                                  output=lambda: finish(proc, 5)[0])
    lost = host_of[killed["pid"]]
    out = finish(proc, timeout=240)[0]
    assert proc.returncode == 0, out[-8000:]
    # ssh reports a remote worker killed by a signal as exit status 255.
    assert re.search(r"Process \d exit with status code 255", out), out[-8000:]
    assert "elastic: a collective failed" in out, out[-8000:]
    (survivor,) = results_of(out)
    # The survivor ran on the other host all along. The discovery script still lists the lost
    # host and --max-np is 2: finishing alone (checked below) means Horovod blacklisted it.
    assert host_of[survivor["pid"]] == 1 - lost
    print(f"killed the worker on {hosts.addresses[lost]} at step {killed['step']}; "
          f"{hosts.addresses[1 - lost]} finished {survivor['steps']} steps alone")
    assert_recovered_and_matches_replay(survivor, killed, commit_dir, tmp_path / "replay",
                                        SIGKILL_EPOCHS)


def test_resume_from_node_local_checkpoints_that_differ_stops_every_rank(
        hosts: SimulatedHosts) -> None:
    """Each host has its own folder at the same path: rank 0's host holds the checkpoint of
    epoch 1, rank 1's host none. Resuming must not hang (it did: ~150 s until killed); every
    rank stops within seconds, naming the ranks and what each saw."""
    ckpt = hosts.local_dir / "ckpt"
    args = ("--optimizer", "dho2", *SHORT, "--verbose", "2", "--checkpoint-dir", str(ckpt))
    first = run_horovod(JOB, 2, (*args, "--epochs", "1"), timeout=240, env=hosts.env(),
                        hosts=hosts.hosts_arg())
    assert result_line(first)["epochs"] == "1"
    # Rank 0 (first host) wrote into its own folder; the second host's stayed empty.
    assert (hosts.host_local_dir(0) / "ckpt" / "checkpoint.json").exists()
    assert not (hosts.host_local_dir(1) / "ckpt" / "checkpoint.json").exists()
    assert not (ckpt / "checkpoint.json").exists()  # nor is it in the launcher's view

    start = time.monotonic()
    proc = start_horovod(JOB, 2, (*args, "--resume", "--allow-config-change", "epochs"),
                         env=hosts.env(), hosts=hosts.hosts_arg())
    out = finish(proc, timeout=60)[0]  # a hang is a failure after 60 s
    seconds = time.monotonic() - start
    print(f"resume with differing node-local checkpoints ended after {seconds:.0f}s "
          f"(exit {proc.returncode})")
    assert proc.returncode != 0, out[-8000:]
    for rank in (0, 1):  # every rank reports it, and what the ranks saw of the checkpoint
        lines = [line for line in out.splitlines() if line.startswith(f"[{rank}]")]
        # The RunConsistencyError of the resume check, as jobs/train.py prints it.
        first = next((i for i, line in enumerate(lines)
                      if f"train.py: error (rank {rank}): Ranks disagree on the checkpoint" in line),
                     None)
        assert first is not None, f"no checkpoint disagreement on rank {rank}:\n{out[-8000:]}"
        assert "checkpoint" in "\n".join(lines[first:first + 20]).lower(), lines[first:]
    assert "RESULT" not in out and "Epoch 2/2" not in out
