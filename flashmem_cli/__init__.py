"""flashmem: local LLM chat whose memory lives on disk."""

__version__ = "0.1.0"
