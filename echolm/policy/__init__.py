"""The paper's learned policies as pure domain logic: load bias, bandit router, replay, eviction,
helpfulness proxy and example threshold. No I/O: the stages in ``streams/`` feed them and persist
their ``state_dict()`` (JSON-safe, never pickle)."""
