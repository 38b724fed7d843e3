//! A test guest that misbehaves on request, for the host's isolation tests: it writes
//! and then fails or traps, spins forever, exhausts memory, and floods the host with
//! writes. Not an example to follow.
//!
//! Keys and values are strings stored as their UTF-8 bytes (not as JSON); values read
//! back that are not UTF-8 come out with U+FFFD in place of bad bytes.
//!
//! | method | input | output / effect |
//! |---|---|---|
//! | `put` | `{"key": "k", "value": "v"}` | `{}` |
//! | `get` | `{"key": "k"}` | `{"value": "v"}` or `{"value": null}` |
//! | `delete` | `{"key": "k"}` | `{}` |
//! | `put-then-fail` | `{"key": "k", "value": "v"}` | writes, then fails with code `deliberate` |
//! | `put-then-trap` | `{"key": "k", "value": "v"}` | writes, then panics (traps) |
//! | `trap` | anything | panics (traps) at once |
//! | `loop` | anything | spins forever (until the host's deadline) |
//! | `bomb` | anything | allocates and touches memory 1 MiB at a time forever (until the host's memory cap traps it) |
//! | `stack-overflow` | anything | recurses until the shadow stack overflows (traps) |
//! | `call` | `{"function": "f", "method": "m", "input": <any JSON, default null>}` | the callee's output bytes, unchanged; the callee's error as is |
//! | `call-then-fail` | same as `call` | calls, then fails with code `deliberate` (message says how the call went) |
//! | `call-catch` | same as `call` | `{"output": <callee's output JSON>, "error": null}` or `{"output": null, "error": {"code": "...", "message": "..."}}`: never fails because the callee did |
//! | `log` | `{"message": "text"}` | logs `text` at info; `{}` |
//! | `put-many` | `{"count": n, "value_len": m}` | puts n values of m bytes at keys `k/0000000`, `k/0000001`, ...; `{"written": n}`, or the first error as the handler's error |
//! | `echo` | any bytes | the same bytes |
//! | `scan` | `{"prefix": "k/", "limit": 10}` | `{"entries": [["k/1", "v"], ...]}` |
//! | `log-many` | `{"count": n, "len": m}` | logs n messages of m bytes at info; `{}` |
//! | `raw` | `{"text": "t"}` | the bytes of `t` as its output, JSON or not |
//! | `big-output` | `{"bytes": n}` | a JSON string of n `x`s (n + 2 bytes of output) |

use serde::{Deserialize, Serialize};
use serde_json::Value;
use understudy_sdk::{call, state, Error, Raw, Result};

understudy_sdk::function! {
    "put" => put,
    "get" => get,
    "delete" => delete,
    "put-then-fail" => put_then_fail,
    "put-then-trap" => put_then_trap,
    "trap" => trap,
    "loop" => spin,
    "bomb" => bomb,
    "stack-overflow" => stack_overflow,
    "call" => call,
    "call-then-fail" => call_then_fail,
    "call-catch" => call_catch,
    "log" => log,
    "put-many" => put_many,
    "echo" => echo,
    "scan" => scan,
    "log-many" => log_many,
    "raw" => raw,
    "big-output" => big_output,
}

const BOMB_STEP_BYTES: usize = 1 << 20;

#[derive(Deserialize)]
struct KeyValue {
    key: String,
    value: String,
}

#[derive(Deserialize)]
struct Key {
    key: String,
}

#[derive(Deserialize)]
struct CallArgs {
    function: String,
    method: String,
    #[serde(default)]
    input: Value,
}

#[derive(Deserialize)]
struct LogArgs {
    message: String,
}

#[derive(Deserialize)]
struct BigOutputArgs {
    bytes: usize,
}

#[derive(Deserialize)]
struct LogManyArgs {
    count: u32,
    len: u32,
}

#[derive(Deserialize)]
struct RawArgs {
    text: String,
}

#[derive(Deserialize)]
struct PutManyArgs {
    count: u32,
    value_len: u32,
}

#[derive(Deserialize)]
struct ScanArgs {
    prefix: String,
    limit: u32,
}

/// Serialises as `{}`.
#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct Got {
    value: Option<String>,
}

#[derive(Serialize)]
struct Caught {
    output: Option<Value>,
    error: Option<CaughtError>,
}

#[derive(Serialize)]
struct CaughtError {
    code: String,
    message: String,
}

#[derive(Serialize)]
struct Written {
    written: u32,
}

#[derive(Serialize)]
struct Entries {
    entries: Vec<(String, String)>,
}

fn put(args: KeyValue) -> Result<Empty> {
    state::put_bytes(args.key, args.value)?;
    Ok(Empty {})
}

fn get(args: Key) -> Result<Got> {
    let value = state::get_bytes(args.key)?;
    Ok(Got {
        value: value.map(|v| String::from_utf8_lossy(&v).into_owned()),
    })
}

fn delete(args: Key) -> Result<Empty> {
    state::delete(args.key)?;
    Ok(Empty {})
}

fn put_then_fail(args: KeyValue) -> Result<Empty> {
    state::put_bytes(&args.key, args.value)?;
    Err(Error::new(
        "deliberate",
        format!("wrote {:?}, then failed on purpose", args.key),
    ))
}

fn put_then_trap(args: KeyValue) -> Result<Empty> {
    state::put_bytes(&args.key, args.value)?;
    panic!("wrote {:?}, then trapped on purpose", args.key);
}

fn trap(_: serde::de::IgnoredAny) -> Result<Empty> {
    panic!("trapped on purpose");
}

fn spin(_: serde::de::IgnoredAny) -> Result<Empty> {
    // black_box keeps the optimiser from proving the loop does nothing.
    let mut turns = 0u64;
    loop {
        turns = core::hint::black_box(turns.wrapping_add(1));
    }
}

fn bomb(_: serde::de::IgnoredAny) -> Result<Empty> {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        // Non-zero fill writes every page, so the memory is really used, not only
        // reserved.
        let block = vec![0xa5u8; BOMB_STEP_BYTES];
        hoard.push(core::hint::black_box(block));
    }
}

fn big_output(args: BigOutputArgs) -> Result<Raw> {
    let mut out = Vec::with_capacity(args.bytes + 2);
    out.push(b'"');
    out.resize(args.bytes + 1, b'x');
    out.push(b'"');
    Ok(Raw(out))
}

fn stack_overflow(_: serde::de::IgnoredAny) -> Result<Empty> {
    let depth = recurse(core::hint::black_box(0));
    Err(Error::new(
        "not-reached",
        format!("recursed {depth} deep without overflowing"),
    ))
}

/// Recurses with a 1 KiB frame until the stack runs out.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let frame = core::hint::black_box([depth as u8; 1024]);
    if depth == u64::MAX {
        return depth;
    }
    recurse(core::hint::black_box(depth + 1)) + u64::from(frame[0])
}

fn call(args: CallArgs) -> Result<Raw> {
    let input = serde_json::to_vec(&args.input)?;
    Ok(Raw(call::invoke_bytes(
        &args.function,
        &args.method,
        &input,
    )?))
}

fn call_then_fail(args: CallArgs) -> Result<Empty> {
    let input = serde_json::to_vec(&args.input)?;
    let outcome = match call::invoke_bytes(&args.function, &args.method, &input) {
        Ok(output) => format!("the call returned {}", String::from_utf8_lossy(&output)),
        Err(e) => format!("the call failed with {e}"),
    };
    Err(Error::new(
        "deliberate",
        format!("{outcome}, then failed on purpose"),
    ))
}

fn call_catch(args: CallArgs) -> Result<Caught> {
    let input = serde_json::to_vec(&args.input)?;
    Ok(
        match call::invoke_bytes(&args.function, &args.method, &input) {
            Ok(output) => Caught {
                // Output that is not JSON is returned as a JSON string.
                output: Some(serde_json::from_slice(&output).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&output).into_owned())
                })),
                error: None,
            },
            Err(e) => Caught {
                output: None,
                error: Some(CaughtError {
                    code: e.code,
                    message: e.message,
                }),
            },
        },
    )
}

fn log(args: LogArgs) -> Result<Empty> {
    understudy_sdk::log::info(&args.message);
    Ok(Empty {})
}

fn put_many(args: PutManyArgs) -> Result<Written> {
    let value = vec![b'v'; args.value_len as usize];
    for i in 0..args.count {
        state::put_bytes(format!("k/{i:07}"), &value)?;
    }
    Ok(Written {
        written: args.count,
    })
}

fn echo(input: Raw) -> Result<Raw> {
    Ok(input)
}

fn scan(args: ScanArgs) -> Result<Entries> {
    let entries = state::scan_prefix_bytes(args.prefix, args.limit)?
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect();
    Ok(Entries { entries })
}

fn log_many(args: LogManyArgs) -> Result<Empty> {
    let message = "x".repeat(args.len as usize);
    for _ in 0..args.count {
        understudy_sdk::log::info(&message);
    }
    Ok(Empty {})
}

fn raw(args: RawArgs) -> Result<Raw> {
    Ok(Raw(args.text.into_bytes()))
}
