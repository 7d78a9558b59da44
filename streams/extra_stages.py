"""Imports every optional stage module so it registers itself with ``streams.app.register_stage``.

Add a line here when you add a stage module (feedback, judge, replay, eviction, ...).
"""
import streams.replay_stage  # noqa: F401,E402  (example-stats, replay, evict)
import streams.feedback_stage  # noqa: F401,E402  (feedback)
import streams.judge_stage  # noqa: F401,E402  (judge)
import streams.learn_stage  # noqa: F401,E402  (learn)
