"""Errors a user can act on.

`UserError` is raised for bad input (a missing file, a corrupt model, a wrong shape, an
impossible budget). The CLI prints its message as one line and exits with code 2; every
message says what is wrong and what to do. Anything else is an internal error (exit 1).
"""


class UserError(Exception):
    """A problem with the user's input or options; the message says how to fix it."""

    exit_code = 2
