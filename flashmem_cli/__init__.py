"""flashmem: local LLM chat whose memory lives on disk."""

from flashmem_cli.engine.threads import short_openmp_spins

__version__ = "0.1.0"

short_openmp_spins()  # before anything imports llama_cpp: libgomp reads it as it loads
