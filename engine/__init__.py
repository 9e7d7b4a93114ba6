"""ikctl's inference engine: GGUF loading, DeepSeek MLA/MoE and Llama forward passes, generation."""

from engine.errors import IkctlError, ModelFileError
from engine.model import Model, Options, load_model

__all__ = ["IkctlError", "Model", "ModelFileError", "Options", "load_model"]
