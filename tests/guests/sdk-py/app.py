"""Exercises the Python SDK (sdk/python) from inside a component, for
tests/all/wasm_languages.rs: every method shows one promise of the SDK. The same methods
exist in tests/guests/sdk-js, so one test drives both."""

import understudy
from understudy import Fail, log, state


# Each transaction runs in a fresh instance, so this counter is 1 whenever `count`
# returns it: nothing in linear memory outlives a call.
calls = 0


@understudy.method("count")
def count(_args):
    global calls
    calls += 1
    return calls


@understudy.method("echo")
def echo(args):
    return args


@understudy.method("raw")
def raw(_args):
    return b'{"raw":true}'


@understudy.method("not-json")
def not_json(_args):
    return {"set": {1, 2}}


@understudy.method("nothing")
def nothing(_args):
    return None


@understudy.method("put")
def put(args):
    state.put(args["key"], args["value"])
    return None


@understudy.method("get")
def get(args):
    return state.get(args["key"])


@understudy.method("delete")
def delete(args):
    state.delete(args["key"])
    return None


@understudy.method("scan")
def scan(args):
    return [[key.decode(), value] for key, value in state.scan_prefix(args["prefix"])]


@understudy.method("put-then-fail")
def put_then_fail(args):
    state.put(args["key"], args["value"])
    raise Fail(args["code"], args["message"])


@understudy.method("put-bad-state")
def put_bad_state(args):
    state.put_bytes(args["key"], b"not json")
    return state.get(args["key"])


@understudy.method("put-not-json")
def put_not_json(args):
    state.put(args["key"], float("nan"))


@understudy.method("crash")
def crash(args):
    state.put("crashed", True)
    raise ValueError(f"boom: {args['why']}")


@understudy.method("call")
def call(args):
    return understudy.call(args["function"], args["method"], args.get("input"))


@understudy.method("call-caught")
def call_caught(args):
    try:
        return {"answer": understudy.call(args["function"], args["method"], args.get("input"))}
    except Fail as e:
        return {"caught": e.code}


@understudy.method("log")
def log_message(args):
    log.info(args["message"])
    return None


Handler = understudy.Handler
