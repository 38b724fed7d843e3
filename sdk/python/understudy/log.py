"""Logging into the node's log, tagged with the function and the transaction.

The node escapes each message, cuts it at 2 KiB and caps what one transaction and one
function may log; ``print`` goes to the same log (stdout and stderr are captured).
"""

from ._host import _wit

__all__ = ["debug", "error", "info", "trace", "warn"]


def _log(level, message):
    if _wit.log is not None:
        _wit.log.log(getattr(_wit.log.Level, level), str(message))


def trace(message):
    _log("TRACE", message)


def debug(message):
    _log("DEBUG", message)


def info(message):
    _log("INFO", message)


def warn(message):
    _log("WARN", message)


def error(message):
    _log("ERROR", message)
