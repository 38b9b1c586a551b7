"""DHO2's distribution modes, one module each (reference §5)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dho2_tf.modes.admm import AdmmMode
from dho2_tf.modes.base import Mode, ShardedMode
from dho2_tf.modes.faithful import FaithfulMode
from dho2_tf.modes.pipelined import PipelinedMode

if TYPE_CHECKING:
    from dho2_tf.optimizer import DHO2

MODES: dict[str, type[Mode]] = {
    "sharded": ShardedMode,
    "faithful": FaithfulMode,
    "pipelined": PipelinedMode,
    "admm": AdmmMode,
}


def make_mode(name: str, opt: "DHO2") -> Mode:
    """The mode object of ``opt`` (``name`` is validated by the optimizer)."""
    return MODES[name](opt)


__all__ = ["MODES", "Mode", "make_mode"]
