"""Errors caused by the user's input: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input, a missing file, an impossible setting: something the user can fix."""


def one_line(error: BaseException) -> str:
    """The error's message as the one line the CLI prints (an OSError's may span many)."""
    return (str(error) or type(error).__name__).splitlines()[0]
