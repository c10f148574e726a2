"""The one error type users see: a one-line message that says what is wrong and how to fix it."""


class BenchError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""
