//! Lists of integers under keys, changed and read in transactions: the workload of the
//! history checkers (list-append, as Jepsen's Elle uses it). Every append is unique, so
//! a read of a list tells the order of every append to that key, and what each
//! transaction read tells which transactions it saw.
//!
//! | method | input | output |
//! |---|---|---|
//! | `txn` | `[["append", key, n] or ["read", key, null], ...]` | the same operations, each read with the list it saw |
//! | `across` | `[["lists-b", [operations as for txn]], ...]` | the groups, each as `txn` of that function answered it |
//!
//! `across` runs each group as a call to `txn` of the function it names (any `lists`
//! function, this one included), all in one transaction: the workload of
//! transactions across functions on different nodes.

use serde::{Deserialize, Serialize};
use understudy_sdk::{call, state, Error, Result};

understudy_sdk::function! {
    "txn" => txn,
    "across" => across,
}

fn across(groups: Vec<(String, Vec<Op>)>) -> Result<Vec<(String, Vec<Op>)>> {
    let mut done = Vec::with_capacity(groups.len());
    for (function, ops) in groups {
        let answered: Vec<Op> = call::invoke(&function, "txn", &ops)?;
        done.push((function, answered));
    }
    Ok(done)
}

#[derive(Deserialize, Serialize)]
struct Op(String, String, Option<Value>);

#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum Value {
    Int(u64),
    List(Vec<u64>),
}

fn txn(ops: Vec<Op>) -> Result<Vec<Op>> {
    let mut done = Vec::with_capacity(ops.len());
    for Op(f, key, value) in ops {
        let state_key = format!("list/{key}");
        match (f.as_str(), value) {
            ("append", Some(Value::Int(n))) => {
                let mut list: Vec<u64> = state::get(&state_key)?.unwrap_or_default();
                list.push(n);
                state::put(&state_key, &list)?;
                done.push(Op(f, key, Some(Value::Int(n))));
            }
            ("read", None) => {
                let list: Vec<u64> = state::get(&state_key)?.unwrap_or_default();
                done.push(Op(f, key, Some(Value::List(list))));
            }
            (f, _) => {
                return Err(Error::bad_input(format!(
                    "expected [\"append\", key, n] or [\"read\", key, null], got {f:?} on {key:?}"
                )))
            }
        }
    }
    Ok(done)
}
