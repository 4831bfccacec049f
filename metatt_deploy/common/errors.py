"""The one exception type that reaches users.

Anything a user can cause (a missing file, a wrong column, an adapter for another base model)
raises `MetaTTError` with a message that names the problem *and* the fix. The CLI prints that
message on one line and exits with status 2; everything else is a bug and keeps its traceback.
"""


class MetaTTError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none), cut to ``limit`` characters.

    Library errors (ONNX Runtime, tokenizers, JSON) often carry a multi-line report; a user sees
    its first line inside a MetaTTError that says what to do.
    """
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
