"""The root of every error ikctl raises on purpose (in engine, rpcnode and tui): a single line naming the problem
and what to do. It lives here, at the bottom of the import graph, because the wire (rpcnode.protocol, .client)
imports nothing from engine."""


class IkctlError(Exception):
    """An error caused by input (a file, a flag, a host, a peer) that the user can fix.

    The message is one line; the CLI prints it as `error: <message>` with no traceback, and a worker answers a
    request that raised it with an error reply whose code comes from the exception's type."""
