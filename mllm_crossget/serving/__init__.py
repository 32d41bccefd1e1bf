"""Interactive use of a CrossGET model: ``crossget chat`` (terminal) and ``crossget serve``
(an OpenAI-compatible HTTP API). Both sit on :class:`~mllm_crossget.serving.engine.Engine`."""

from .engine import ChatMessage, Engine, GenerationResult, Sampling, Setting, load_model

__all__ = ["ChatMessage", "Engine", "GenerationResult", "Sampling", "Setting", "load_model"]
