//! An inventory: stock items, and orders that reserve several items at once, all or
//! nothing.
//!
//! `order` reserves its lines one after another, writing as it goes, and returns an
//! error as soon as one line cannot be reserved. It never undoes the lines it already
//! reserved: the error aborts the transaction, and the runtime discards every write the
//! handler made. This is the point of the example.
//!
//! State: `item/<item>` holds `{"available": n, "reserved": n}`; `order/<order>` holds
//! the order record `{"order": "o1", "status": "placed" | "cancelled", "items":
//! [{"item": "apple", "quantity": 2}, ...]}`. Quantities are `u64`; names and order ids
//! are 1 to 256 bytes; an order has 1 to 1000 lines (an item may appear on several).
//!
//! | method | input | output | errors |
//! |---|---|---|---|
//! | `stock` | `{"item": "apple", "quantity": 10}` | `{"item": "apple", "available": 10, "reserved": 0}` | `bad-input` (quantity 0), `overflow` |
//! | `order` | `{"order": "o1", "items": [{"item": "apple", "quantity": 2}]}` | `{"order": "o1", "status": "placed", "items": [{"item": "apple", "quantity": 2}]}` | `exists` (order id used before, even if cancelled), `no-item`, `insufficient` (the message names the item), `bad-input` (no lines, quantity 0) |
//! | `cancel` | `{"order": "o1"}` | `{"order": "o1", "status": "cancelled"}` | `no-order`, `not-placed` (already cancelled) |
//! | `item` | `{"item": "apple"}` | `{"item": "apple", "available": 8, "reserved": 2}` | `no-item` |
//! | `order-status` | `{"order": "o1"}` | the order record, as `order` returns it | `no-order` |
//!
//! Reserving moves a quantity from `available` to `reserved`; cancelling moves it back.
//! Input that does not parse (missing or unknown fields) fails with `bad-input`.

use serde::{Deserialize, Serialize};
use understudy_sdk::{state, Error, Result};

understudy_sdk::function! {
    "stock" => stock,
    "order" => order,
    "cancel" => cancel,
    "item" => item,
    "order-status" => order_status,
}

const ITEM_PREFIX: &str = "item/";
const ORDER_PREFIX: &str = "order/";
const NAME_LEN_MAX: usize = 256;
const ORDER_LINES_MAX: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StockArgs {
    item: String,
    quantity: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemArgs {
    item: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderIdArgs {
    order: String,
}

/// What `item/<item>` holds.
#[derive(Serialize, Deserialize, Default)]
struct Stock {
    available: u64,
    reserved: u64,
}

#[derive(Serialize)]
struct ItemView {
    item: String,
    available: u64,
    reserved: u64,
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Status {
    Placed,
    Cancelled,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    item: String,
    quantity: u64,
}

/// The input of `order`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaceArgs {
    order: String,
    items: Vec<Line>,
}

/// What `order/<order>` holds.
#[derive(Serialize, Deserialize)]
struct Order {
    order: String,
    status: Status,
    items: Vec<Line>,
}

#[derive(Serialize)]
struct Cancelled {
    order: String,
    status: Status,
}

fn stock(args: StockArgs) -> Result<ItemView> {
    require_quantity(&args.item, args.quantity)?;
    let key = item_key(&args.item)?;
    let mut stock = state::get::<Stock>(&key)?.unwrap_or_default();
    stock.available = stock.available.checked_add(args.quantity).ok_or_else(|| {
        Error::new(
            "overflow",
            format!(
                "stocking {} more of item {:?} overflows",
                args.quantity, args.item
            ),
        )
    })?;
    state::put(&key, &stock)?;
    Ok(view(args.item, &stock))
}

fn order(args: PlaceArgs) -> Result<Order> {
    let order = Order {
        order: args.order,
        status: Status::Placed,
        items: args.items,
    };
    let key = order_key(&order.order)?;
    if order.items.is_empty() || order.items.len() > ORDER_LINES_MAX {
        return Err(Error::bad_input(format!(
            "an order has 1 to {ORDER_LINES_MAX} lines, not {}",
            order.items.len()
        )));
    }
    if state::get_bytes(&key)?.is_some() {
        return Err(Error::new(
            "exists",
            format!("order {:?} already exists", order.order),
        ));
    }
    // Reserve line by line. A failure returns an error, which aborts the transaction
    // and with it the lines already reserved: no undo needed here.
    for line in &order.items {
        reserve(line)?;
    }
    state::put(&key, &order)?;
    Ok(order)
}

fn cancel(args: OrderIdArgs) -> Result<Cancelled> {
    let key = order_key(&args.order)?;
    let mut order = read_order(&args.order)?;
    if order.status != Status::Placed {
        return Err(Error::new(
            "not-placed",
            format!("order {:?} is already cancelled", args.order),
        ));
    }
    for line in &order.items {
        release(line)?;
    }
    order.status = Status::Cancelled;
    state::put(&key, &order)?;
    Ok(Cancelled {
        order: order.order,
        status: order.status,
    })
}

fn item(args: ItemArgs) -> Result<ItemView> {
    let stock = read_stock(&args.item)?;
    Ok(view(args.item, &stock))
}

fn order_status(args: OrderIdArgs) -> Result<Order> {
    read_order(&args.order)
}

fn reserve(line: &Line) -> Result<()> {
    require_quantity(&line.item, line.quantity)?;
    let mut stock = read_stock(&line.item)?;
    stock.available = stock.available.checked_sub(line.quantity).ok_or_else(|| {
        Error::new(
            "insufficient",
            format!(
                "item {:?}: {} available, {} ordered",
                line.item, stock.available, line.quantity
            ),
        )
    })?;
    stock.reserved = stock.reserved.checked_add(line.quantity).ok_or_else(|| {
        Error::new(
            "overflow",
            format!("item {:?}: reserved overflows", line.item),
        )
    })?;
    state::put(item_key(&line.item)?, &stock)
}

fn release(line: &Line) -> Result<()> {
    let mut stock = read_stock(&line.item)?;
    let broken = || {
        Error::new(
            "bad-state",
            format!("item {:?}: cannot release {}", line.item, line.quantity),
        )
    };
    stock.reserved = stock
        .reserved
        .checked_sub(line.quantity)
        .ok_or_else(broken)?;
    stock.available = stock
        .available
        .checked_add(line.quantity)
        .ok_or_else(broken)?;
    state::put(item_key(&line.item)?, &stock)
}

fn read_stock(item: &str) -> Result<Stock> {
    state::get(item_key(item)?)?.ok_or_else(|| Error::new("no-item", format!("no item {item:?}")))
}

fn read_order(order: &str) -> Result<Order> {
    state::get(order_key(order)?)?
        .ok_or_else(|| Error::new("no-order", format!("no order {order:?}")))
}

fn require_quantity(item: &str, quantity: u64) -> Result<()> {
    if quantity == 0 {
        return Err(Error::bad_input(format!(
            "item {item:?}: the quantity must be positive"
        )));
    }
    Ok(())
}

fn item_key(item: &str) -> Result<String> {
    check_name("an item name", item)?;
    Ok(format!("{ITEM_PREFIX}{item}"))
}

fn order_key(order: &str) -> Result<String> {
    check_name("an order id", order)?;
    Ok(format!("{ORDER_PREFIX}{order}"))
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > NAME_LEN_MAX {
        return Err(Error::bad_input(format!(
            "{what} is 1 to {NAME_LEN_MAX} bytes, not {}",
            name.len()
        )));
    }
    Ok(())
}

fn view(item: String, stock: &Stock) -> ItemView {
    ItemView {
        item,
        available: stock.available,
        reserved: stock.reserved,
    }
}
