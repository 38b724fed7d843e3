//! Orders that reserve stock in `inventory`, charge the customer in `payments` and are
//! recorded here, in one transaction that succeeds or fails as a whole.
//!
//! `inventory` is the `inventory` example and `payments` the `bank` example deployed
//! under that name (customers are its accounts); their primaries may be on other nodes
//! than this function's. If the stock is short, the customer cannot pay, or the order
//! id was used before, the handler returns an error and nothing of the order remains
//! anywhere: no reservation, no charge, no record.
//!
//! State: `order/<order>` holds `{"order": "o1", "customer": "carol", "items": [{"item":
//! "apple", "quantity": 2}], "amount": 30, "status": "placed"}`.
//!
//! | method | input | output | errors |
//! |---|---|---|---|
//! | `place` | `{"order": "o1", "customer": "carol", "items": [{"item": "apple", "quantity": 2}], "amount": 30}` | the order record, with `"balance"`: what the customer has left | `exists` (order id used before), `bad-input` (no items, amount 0); from `inventory`: `no-item`, `insufficient`; from `payments`: `no-account`, `overdraft` |
//! | `get` | `{"order": "o1"}` | the order record | `no-order` |
//!
//! Input that does not parse (missing or unknown fields) fails with `bad-input`.

use serde::{Deserialize, Serialize};
use understudy_sdk::{call, state, Error, Result};

understudy_sdk::function! {
    "place" => place,
    "get" => get,
}

const ORDER_PREFIX: &str = "order/";
const INVENTORY: &str = "inventory";
const PAYMENTS: &str = "payments";

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct Line {
    item: String,
    quantity: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaceArgs {
    order: String,
    customer: String,
    items: Vec<Line>,
    amount: u64,
}

#[derive(Deserialize, Serialize)]
struct Order {
    order: String,
    customer: String,
    items: Vec<Line>,
    amount: u64,
    status: String,
}

#[derive(Serialize)]
struct Placed {
    #[serde(flatten)]
    order: Order,
    balance: u64,
}

#[derive(Serialize)]
struct Reserve<'a> {
    order: &'a str,
    items: &'a [Line],
}

#[derive(Serialize)]
struct Charge<'a> {
    account: &'a str,
    amount: u64,
}

/// What `payments`' `withdraw` answers.
#[derive(Deserialize)]
struct Balance {
    balance: u64,
}

fn place(args: PlaceArgs) -> Result<Placed> {
    if args.items.is_empty() {
        return Err(Error::bad_input("an order needs at least one item"));
    }
    if args.amount == 0 {
        return Err(Error::bad_input("amount must be positive"));
    }
    let key = format!("{ORDER_PREFIX}{}", args.order);
    if state::get::<Order>(&key)?.is_some() {
        return Err(Error::new(
            "exists",
            format!("order {} was placed before", args.order),
        ));
    }
    // Each step may fail with its own error; the error aborts the whole transaction,
    // so a failed payment leaves no reservation behind, on whatever node it was made.
    let _reserved: serde::de::IgnoredAny = call::invoke(
        INVENTORY,
        "order",
        &Reserve {
            order: &args.order,
            items: &args.items,
        },
    )?;
    let paid: Balance = call::invoke(
        PAYMENTS,
        "withdraw",
        &Charge {
            account: &args.customer,
            amount: args.amount,
        },
    )?;
    let order = Order {
        order: args.order,
        customer: args.customer,
        items: args.items,
        amount: args.amount,
        status: "placed".into(),
    };
    state::put(&key, &order)?;
    Ok(Placed {
        order,
        balance: paid.balance,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetArgs {
    order: String,
}

fn get(args: GetArgs) -> Result<Order> {
    state::get(format!("{ORDER_PREFIX}{}", args.order))?
        .ok_or_else(|| Error::new("no-order", format!("no order {}", args.order)))
}
