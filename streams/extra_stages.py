"""Imports every optional stage module so it registers itself with ``streams.app.register_stage``.

Add a line here when you add a stage module (feedback, judge, replay, eviction, ...).
"""
