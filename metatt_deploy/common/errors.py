"""The one exception type that reaches users.

Anything a user can cause (a missing file, a wrong column, an adapter for another base model)
raises `MetaTTError` with a message that names the problem *and* the fix. The CLI prints that
message on one line and exits with status 2; everything else is a bug and keeps its traceback.
"""


class MetaTTError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


FIRST_LINE_LIMIT = 200


def first_line(error: BaseException) -> str:
    """The first line of an error's message, at most ``FIRST_LINE_LIMIT`` characters, or its type's name if the message is empty.

    Library errors (transformers, onnxruntime, safetensors, datasets) often carry a traceback-sized
    message; a `MetaTTError` that wraps one quotes only this, so the user still sees one line that
    says what broke and then what to do.
    """
    lines = str(error).strip().splitlines()
    return lines[0][:FIRST_LINE_LIMIT] if lines else type(error).__name__
