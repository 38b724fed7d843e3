"""Unit tests of the Python SDK on CPython, with a fake host in place of the bindings
componentize-py generates (the integration tests run it inside a real component).

Run: python3 -m unittest discover -s sdk/python
"""

import json
import unittest

import understudy
from understudy import Fail, _host, state


class FakeState:
    """The `state` interface over a dict, with the host's `limit` error."""

    def __init__(self):
        self.data = {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        if len(value) > 100:
            raise _host.Err(_host.Error("limit", "value too large"))
        self.data[key] = value

    def delete(self, key):
        self.data.pop(key, None)

    def scan(self, start, end, limit):
        keys = sorted(k for k in self.data if k >= start and (end is None or k < end))
        return [Entry(k, self.data[k]) for k in keys[:limit]]


class Entry:
    def __init__(self, key, value):
        self.key, self.value = key, value


class FakeCall:
    def invoke(self, function, method, input):
        if function == "nowhere":
            raise _host.Err(_host.Error("unknown-function", "no function named nowhere"))
        return json.dumps({"function": function, "method": method, "input": json.loads(input)}).encode()


class SdkTest(unittest.TestCase):
    def setUp(self):
        self.saved = (_host._Namespace.state, _host._Namespace.call, dict(understudy._METHODS))
        _host._Namespace.state = FakeState()
        _host._Namespace.call = FakeCall()
        understudy._METHODS.clear()

    def tearDown(self):
        _host._Namespace.state, _host._Namespace.call, methods = self.saved
        understudy._METHODS.clear()
        understudy._METHODS.update(methods)

    def fails_with(self, code, f, *args):
        with self.assertRaises(Fail) as caught:
            f(*args)
        self.assertEqual(caught.exception.code, code, caught.exception.message)
        return caught.exception

    def test_dispatch_parses_json_and_writes_json(self):
        understudy.method("echo")(lambda args: {"got": args})
        self.assertEqual(understudy.handle("echo", b'{"a": [1, 2]}'), b'{"got":{"a":[1,2]}}')

    def test_empty_input_is_none(self):
        understudy.method("echo")(lambda args: args)
        self.assertEqual(understudy.handle("echo", b""), b"null")
        self.assertEqual(understudy.handle("echo", b" \n"), b"null")

    def test_method_name_defaults_to_the_function_name(self):
        @understudy.method
        def ping(_args):
            return "pong"

        self.assertEqual(understudy.handle("ping", b""), b'"pong"')

    def test_unknown_method_names_the_known_ones(self):
        understudy.method("a")(lambda args: None)
        understudy.method("b")(lambda args: None)
        e = self.fails_with("unknown-method", understudy.handle, "c", b"")
        self.assertIn("a, b", e.message)

    def test_input_that_is_not_json_is_bad_input(self):
        understudy.method("m")(lambda args: None)
        e = self.fails_with("bad-input", understudy.handle, "m", b"{")
        self.assertIn("`m`", e.message)

    def test_output_that_is_not_json_is_bad_output_naming_the_method(self):
        understudy.method("s")(lambda args: {1, 2})
        understudy.method("nan")(lambda args: float("nan"))
        understudy.method("obj")(lambda args: object())
        for name in ("s", "nan", "obj"):
            e = self.fails_with("bad-output", understudy.handle, name, b"")
            self.assertIn(f"`{name}`", e.message)

    def test_bytes_pass_through(self):
        understudy.method("raw")(lambda args: b"\x00\xff")
        self.assertEqual(understudy.handle("raw", b""), b"\x00\xff")

    def test_a_method_registered_twice_is_refused(self):
        understudy.method("m")(lambda args: None)
        with self.assertRaises(ValueError):
            understudy.method("m")(lambda args: None)

    def test_fail_becomes_the_wit_error_and_other_exceptions_propagate(self):
        understudy.method("refuse")(lambda args: (_ for _ in ()).throw(Fail("overdraft", "too little")))
        understudy.method("bug")(lambda args: 1 / 0)
        with self.assertRaises(_host.Err) as caught:
            understudy.Handler().handle("refuse", b"")
        self.assertEqual((caught.exception.value.code, caught.exception.value.message), ("overdraft", "too little"))
        with self.assertRaises(ZeroDivisionError):
            understudy.Handler().handle("bug", b"")

    def test_state_round_trips_json(self):
        state.put("k", {"n": [1, "x"]})
        self.assertEqual(state.get("k"), {"n": [1, "x"]})
        self.assertEqual(state.get(b"k"), {"n": [1, "x"]})
        self.assertIsNone(state.get("missing"))
        state.delete("k")
        self.assertIsNone(state.get("k"))

    def test_state_refuses_what_is_not_json(self):
        self.fails_with("bad-output", state.put, "k", {1})
        state.put_bytes("b", b"not json")
        self.fails_with("bad-state", state.get, "b")

    def test_host_errors_arrive_as_fail_with_the_host_code(self):
        self.fails_with("limit", state.put, "k", "x" * 200)
        self.fails_with("unknown-function", understudy.call, "nowhere", "m", None)

    def test_scan_prefix_stays_within_the_prefix(self):
        for key in ("a/1", "a/2", "b/1"):
            state.put(key, key)
        self.assertEqual(state.scan_prefix("a/"), [(b"a/1", "a/1"), (b"a/2", "a/2")])
        page = state.scan("a/", state.prefix_end("a/"), 1)
        self.assertEqual(page, [(b"a/1", "a/1")])
        self.assertEqual(state.scan(state.key_after(page[-1][0]), b"a0", 10), [(b"a/2", "a/2")])

    def test_prefix_end(self):
        self.assertEqual(state.prefix_end("acct/"), b"acct0")
        self.assertEqual(state.prefix_end(b"a\xff"), b"b")
        self.assertIsNone(state.prefix_end(b"\xff\xff"))
        self.assertIsNone(state.prefix_end(b""))

    def test_call_writes_and_reads_json(self):
        out = understudy.call("bank", "balance", {"account": "a"})
        self.assertEqual(out, {"function": "bank", "method": "balance", "input": {"account": "a"}})
        self.fails_with("bad-output", understudy.call, "bank", "balance", {1})


if __name__ == "__main__":
    unittest.main()
