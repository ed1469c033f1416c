"""argparse types shared by the outbox's commands: bad input names the option."""

import argparse
from datetime import timedelta

from outbox.conf import MAX_PORT
from outbox.pruning import parse_duration


def positive_int(text: str) -> int:
    """Parse a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def port_number(text: str) -> int:
    """Parse a TCP port: 1 to 65535."""
    value = positive_int(text)
    if value > MAX_PORT:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1 to {MAX_PORT})")
    return value


def seconds(text: str) -> float:
    """Parse a number of seconds, zero or more."""
    return _seconds(text, allow_zero=True)


def positive_seconds(text: str) -> float:
    """Parse a number of seconds greater than zero."""
    return _seconds(text, allow_zero=False)


def duration(text: str) -> timedelta:
    """Parse a duration such as 30m, 12h or 7d."""
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seconds(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 if allow_zero else value > 0):
        expected = "zero or more" if allow_zero else "a positive number"
        raise argparse.ArgumentTypeError(f"{text} is not {expected}")
    return value
