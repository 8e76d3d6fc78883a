"""Errors caused by the user's input: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input, a missing file, an impossible setting: something the user can fix."""
