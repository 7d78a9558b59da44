"""Stage 1 retrieval: sentence embeddings, per-tenant vector indexes, the in-memory example cache.

Import the concrete modules directly (``echolm.retrieval.embedder`` pulls in torch only when a
model is loaded; ``faiss_index`` and ``example_cache`` need faiss).
"""
