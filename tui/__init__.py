"""The `ikctl` command: CLI entry points (and, later, the Textual app and cluster launch)."""
