"""Quality signals: task verifiers for data with references, and the paper's pairwise LLM judge."""
