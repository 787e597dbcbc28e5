"""Argument types of the command line: each refuses a bad value with one line."""

from __future__ import annotations

import argparse

from service.protocol import PRIORITY_CLASSES


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0..65535, got {value}")
    return value


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def label(text: str) -> tuple[str, str]:
    """KEY=VALUE (the value may be empty); the server checks the characters."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"must look like KEY=VALUE, got {text!r}")
    return key, value


def priority_value(text: str) -> int:
    """low, normal, high, or an integer (the server checks its range)."""
    named = PRIORITY_CLASSES.get(text.strip().lower())
    if named is not None:
        return named
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be {', '.join(PRIORITY_CLASSES)} or an integer, got {text!r}"
        ) from None


def seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number of seconds, got {text}")
    return value
