"""EchoLM: in-context caching for LLM serving."""

__version__ = "0.1.0"
