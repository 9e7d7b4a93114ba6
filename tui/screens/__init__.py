"""The TUI's screens, one per mode, each with its .tcss beside it."""
