"""The one exception type that reaches users.

Anything a user can cause (a missing file, a wrong column, an adapter for another base model)
raises `MetaTTError` with a message that names the problem *and* the fix. The CLI prints that
message on one line and exits with status 2; everything else is a bug and keeps its traceback.
"""


class MetaTTError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""
