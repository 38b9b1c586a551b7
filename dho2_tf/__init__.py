"""dho2_tf: distributed hybrid-order optimization (DHO2/FOSI) for Keras + Horovod.

Public API::

    from dho2_tf import DHO2, CurvatureRefresh, training_loop, LocalComm, HorovodComm, default_comm

``CurvatureRefresh`` drives DHO2 in ``model.fit``; ``training_loop`` in a custom loop.
"""

from __future__ import annotations

from dho2_tf.callbacks import CurvatureRefresh
from dho2_tf.custom_loop import TrainingLoop, training_loop
from dho2_tf.distributed.comm import Communicator, HorovodComm, LocalComm, default_comm
from dho2_tf.optimizer import DHO2

__version__ = "0.1.0"

__all__ = ["DHO2", "CurvatureRefresh", "Communicator", "HorovodComm", "LocalComm",
           "TrainingLoop", "default_comm", "training_loop"]
