"""The bindings componentize-py generates, and the one error type of the SDK."""

try:
    from componentize_py_types import Err
    from wit_world.exports import Handler as HandlerBase
    from wit_world.imports import call, log, state
    from wit_world.imports.types import Error
except ImportError:  # Outside a component (unit tests, editors): no host to call.
    call = log = state = None

    class Err(Exception):
        def __init__(self, value):
            super().__init__(value)
            self.value = value

    class Error:
        def __init__(self, code, message):
            self.code, self.message = code, message

    class HandlerBase:
        pass


class Fail(Exception):
    """A refusal with a short machine-readable ``code`` (``overdraft``,
    ``no-account``, ``bad-input``) and a ``message`` for people. Raised from a
    method, it aborts the transaction and reaches the client with both."""

    def __init__(self, code, message=""):
        super().__init__(f"{code}: {message}")
        self.code = str(code)
        self.message = str(message)


def _fail_from_host(err):
    """A host error (``Err(Error)``) as a ``Fail`` with the host's code."""
    value = err.value
    return Fail(getattr(value, "code", "host"), getattr(value, "message", str(value)))


class _Namespace:
    """The generated modules, by name, so callers write ``_wit.state.get``."""

    Err = Err
    Error = Error
    HandlerBase = HandlerBase
    call = call
    log = log
    state = state


_wit = _Namespace
