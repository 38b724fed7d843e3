"""Write Understudy functions in Python.

A function is a WebAssembly component built with componentize-py against the WIT
world in ``wit/``. This package wraps that world so that a function is a set of
methods taking and returning JSON values:

.. code-block:: python

    import understudy
    from understudy import Fail, state

    @understudy.method("increment")
    def increment(args):
        by = (args or {}).get("by", 1)
        value = (state.get("count") or 0) + by
        state.put("count", value)
        return {"value": value}

    # componentize-py looks for the class `Handler` in the app module.
    Handler = understudy.Handler

Everything one invocation does (state reads and writes, calls to other functions and
what they do) is one transaction: it commits when the method returns, and is rolled
back when the method raises.

- Input is JSON; an empty body arrives as ``None``. Input that is not JSON fails with
  code ``bad-input``, a method not registered with ``unknown-method``.
- The method's return value is written as JSON (``bytes`` are sent as they are).
  Anything else (a set, an object, NaN) fails with code ``bad-output`` naming the
  method, and the transaction is rolled back.
- ``raise Fail(code, message)`` aborts the transaction and answers the client with
  that code (HTTP 422; 400 for ``bad-input``). Errors from the host (``limit``,
  ``unknown-function``, ``call-not-granted``, ...) arrive as ``Fail`` too, so letting
  one propagate passes its code on, as ``?`` does in the Rust SDK.
- Any other exception is a bug: its traceback is logged and printed to stderr, and the
  instance traps (HTTP 500, code ``trap``, with the end of stderr in the message).

The host's own modules (``wit_world``, ``componentize_py_types``) exist only inside
the component; importing this package elsewhere works, but calling the host does not.
"""

import json
import traceback

from . import log, state
from ._host import Fail, _fail_from_host, _wit

__all__ = ["Fail", "Handler", "call", "call_bytes", "log", "method", "state"]

# The registered methods, by name.
_METHODS = {}


def method(name=None):
    """Registers the decorated function as the method ``name`` (its own name by
    default). The function takes one argument, the parsed JSON input (``None`` for an
    empty body), and returns a JSON-able value or ``bytes``."""

    def register(function):
        key = name or function.__name__
        if key in _METHODS:
            raise ValueError(f"method {key!r} is registered twice")
        _METHODS[key] = function
        return function

    if callable(name):
        function, name = name, None
        return register(function)
    return register


def call(function, method_name, input=None):
    """Invokes ``method_name`` of ``function`` with ``input`` written as JSON, inside
    this transaction, and returns its output parsed as JSON (``None`` for empty output).

    Raises ``Fail`` with the callee's own error, or the host's (``unknown-function``,
    ``call-not-granted``, ``stopped``, ``depth``, ``trap``); ``bad-output`` when
    ``input`` is not JSON-able or the callee's output is not JSON."""
    body = _to_json(input, f"input of a call to `{function}` method `{method_name}`")
    output = call_bytes(function, method_name, body)
    try:
        return _from_json(output)
    except ValueError as e:
        raise Fail("bad-output", f"output of `{function}` method `{method_name}`: {e}") from None


def call_bytes(function, method_name, input):
    """Like ``call``, with the input and output as bytes."""
    try:
        return _wit.call.invoke(function, method_name, bytes(input))
    except _wit.Err as e:
        raise _fail_from_host(e) from None


def handle(method_name, input):
    """Runs one method on one input: the body of ``Handler.handle``, usable in tests.
    Returns the output bytes; raises ``Fail`` for the method's error."""
    function = _METHODS.get(method_name)
    if function is None:
        known = ", ".join(sorted(_METHODS)) or "none"
        raise Fail("unknown-method", f"no method `{method_name}`; this function has: {known}")
    try:
        args = _from_json(input)
    except ValueError as e:
        raise Fail("bad-input", f"input of `{method_name}`: {e}") from None
    output = function(args)
    if isinstance(output, (bytes, bytearray, memoryview)):
        return bytes(output)
    return _to_json(output, f"method `{method_name}` returned a value that")


class Handler(_wit.HandlerBase):
    """The component's export. Assign it in the app module: ``Handler = understudy.Handler``."""

    def handle(self, method, input):
        try:
            return handle(method, input)
        except Fail as e:
            raise _wit.Err(_wit.Error(e.code, e.message)) from None
        except Exception:
            # A bug, not a refusal: trap, as a Rust panic does, after saying why where
            # the operator (log) and the client (stderr, in the trap's message) see it.
            text = traceback.format_exc()
            log.error(f"method `{method}` raised:\n{text}")
            raise


def _from_json(data):
    """JSON bytes as a value; empty (or blank) input is ``None``."""
    if not bytes(data).strip():
        return None
    return json.loads(bytes(data))


def _to_json(value, what):
    """``value`` as compact JSON bytes, or ``Fail("bad-output")`` saying why not."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise Fail("bad-output", f"{what} is not JSON: {e}") from None
