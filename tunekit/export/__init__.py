"""Export adapters to where people run models locally: GGUF for llama.cpp / LM Studio, and Ollama.

Heavy imports (torch, gguf, safetensors) happen inside the functions, when an export runs.
"""

from .run import FORMATS, ExportResult, export_model
from .gguf_file import OUTTYPES

__all__ = ["FORMATS", "OUTTYPES", "ExportResult", "export_model"]
