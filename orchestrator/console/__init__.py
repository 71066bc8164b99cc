"""The terminal: the shared command-line shell, stop signals, progress lines, log filters."""
