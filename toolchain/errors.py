"""User-facing errors: one clear line, non-zero exit, no traceback."""


class ToolchainError(Exception):
    """A problem with the user's input or environment, reported as one line by the CLI."""
