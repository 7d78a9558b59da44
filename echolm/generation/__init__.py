"""Generation backends: one ``Generator`` per model tier (see ``echolm.protocols.Generator``).

Use ``echolm.generation.factory.make_generator``; backends are imported lazily there so that
importing this package does not load llama.cpp.
"""
