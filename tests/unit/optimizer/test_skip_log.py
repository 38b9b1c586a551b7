"""SkipLog: a run that keeps skipping logs the first skip, every N-th, per-epoch counts and a
final total, on rank 0 only."""

from __future__ import annotations

import logging

import tensorflow as tf

from dho2_tf.fosi_step import SkipLog


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dho2_tf.fosi_step"]


def test_first_then_every_nth_then_epoch_counts_and_total(caplog):
    log = SkipLog(every=3)
    with caplog.at_level(logging.WARNING, logger="dho2_tf"):
        for total in range(1, 8):                        # steps 10..16 all skipped
            log.log_step(tf.constant(9 + total), tf.constant(total), is_root=True)
        logged_steps = [m.split()[3].rstrip(":") for m in messages(caplog)]
        assert logged_steps == ["10", "12", "15"]        # skips 1, 3 and 6
        caplog.clear()
        assert log.report(7, is_root=True) == 7          # nothing new since the 7th was seen
        assert messages(caplog) == []
        log.report(9, is_root=True)                      # 2 more skipped in a multi-step call
        assert messages(caplog) == ["DHO2 skipped 2 step(s) with a non-finite gradient or "
                                    "base step (9 so far)"]
        caplog.clear()
        log.summary(is_root=True)
        assert messages(caplog) == ["DHO2 skipped 9 step(s) in total with a non-finite "
                                    "gradient or base step (weights and statistics unchanged "
                                    "at each)"]


def test_other_ranks_log_nothing(caplog):
    log = SkipLog(every=1)
    with caplog.at_level(logging.WARNING, logger="dho2_tf"):
        log.log_step(tf.constant(3), tf.constant(1), is_root=False)
        log.report(2, is_root=False)
        log.summary(is_root=False)
    assert messages(caplog) == [] and log.reported == 2
