"""The one exception hierarchy a user sees (rooted at rpcnode.errors.IkctlError); the engine's own kinds."""

from rpcnode.errors import IkctlError

__all__ = ["IkctlError", "ModelFileError"]


class ModelFileError(IkctlError):
    """A model file is missing, truncated, of an unsupported architecture or tensor type."""
