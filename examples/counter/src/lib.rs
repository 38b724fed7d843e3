//! A counter: the smallest useful Understudy function.
//!
//! State: one key, `count`, holding the count as a JSON number.
//!
//! | method | input | output | errors |
//! |---|---|---|---|
//! | `increment` | none, `null`, `{}` or `{"by": n}` (default 1) | `{"value": n}`, the new count | `overflow` past `u64::MAX`; `bad-input` |
//! | `get` | anything (ignored) | `{"value": n}`, 0 if never incremented | |

use serde::{Deserialize, Serialize};
use understudy_sdk::{state, Error, Result};

understudy_sdk::function! {
    "increment" => increment,
    "get" => get,
}

const KEY: &str = "count";

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct IncrementArgs {
    by: Option<u64>,
}

#[derive(Serialize)]
struct Count {
    value: u64,
}

fn increment(args: Option<IncrementArgs>) -> Result<Count> {
    let by = args.unwrap_or_default().by.unwrap_or(1);
    let value = state::get::<u64>(KEY)?.unwrap_or(0);
    let value = value
        .checked_add(by)
        .ok_or_else(|| Error::new("overflow", format!("{value} + {by} overflows the counter")))?;
    state::put(KEY, &value)?;
    Ok(Count { value })
}

fn get(_: serde::de::IgnoredAny) -> Result<Count> {
    let value = state::get(KEY)?.unwrap_or(0);
    Ok(Count { value })
}
