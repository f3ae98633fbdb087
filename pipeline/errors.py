"""One exception type for everything a user can fix: the CLI prints its message on one line and exits 1."""


class KdqaError(Exception):
    """A problem with the user's input or environment, with a message that names the file and record."""
