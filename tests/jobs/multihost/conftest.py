"""Fixtures of the multi-host tests: two simulated hosts (network namespaces with sshd), built
once per module and torn down after it; leftover workers killed after every test."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.helpers.netns_hosts import NetnsUnavailable, SimulatedHosts, simulated_hosts


@pytest.fixture(scope="module")
def hosts() -> Iterator[SimulatedHosts]:
    """Two hosts, ``hosts.addresses`` = ("10.213.0.2", "10.213.0.3"). Fails (never skips) when
    this machine cannot build them."""
    try:
        with simulated_hosts(2) as built:
            yield built
    except NetnsUnavailable as err:
        pytest.fail(f"cannot build the simulated hosts: {err}", pytrace=False)


@pytest.fixture(autouse=True)
def no_workers_left(hosts: SimulatedHosts) -> Iterator[None]:
    """Kill what a test left running on the hosts (workers of a timed-out launch)."""
    yield
    hosts.kill_workers()
