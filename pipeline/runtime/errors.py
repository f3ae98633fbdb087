"""One exception type for everything a user can fix: the CLI prints its message on one line and exits 1."""


class KdqaError(ValueError):
    """A problem with the user's input or environment, with a message that names the file and record.

    A ValueError, so that code calling kdqa's Python API (`QuestionAnswerer`) can catch bad arguments the
    way it catches them from any library."""
