"""common/errors.first_line: the one way a wrapped library error is quoted in a one-line MetaTTError."""

from __future__ import annotations

import pytest

from metatt_deploy.common.errors import FIRST_LINE_LIMIT, first_line


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ValueError("bad header\nTraceback (most recent call last):\n  ..."), "bad header"),
        (OSError("\n  leading blank lines\nsecond"), "leading blank lines"),
        (KeyError(), "KeyError"),
        (RuntimeError("   \n  "), "RuntimeError"),
    ],
)
def test_first_line_is_the_first_line_or_the_type(error: BaseException, expected: str) -> None:
    assert first_line(error) == expected


def test_first_line_is_capped() -> None:
    assert first_line(ValueError("x" * 1000 + "\nmore")) == "x" * FIRST_LINE_LIMIT
