"""The one exception type a user sees: a single line naming the problem and what to do."""


class IkctlError(Exception):
    """An error caused by input (a file, a flag, a host) that the user can fix.

    The message is one line; the CLI prints it as `error: <message>` with no traceback.
    """


class ModelFileError(IkctlError):
    """A model file is missing, truncated, of an unsupported architecture or tensor type."""
