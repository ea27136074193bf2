"""Errors a user can cause. The CLI prints their message on one line and exits with 2."""


class Q4KError(Exception):
    """A problem with the user's input or environment, with a message fit to print as is."""


class FileFormatError(Q4KError):
    """A teacher/student file that is not what it claims to be (bad magic, truncated, lying header)."""

    def __init__(self, path, problem):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
