//! Transfers between accounts kept by other functions: the bank across functions.
//!
//! Accounts live in `bank` functions (the `bank` example, deployed under several names,
//! such as `bank-east` and `bank-west`), whose primaries may be on different nodes.
//! `transfer` withdraws from one and deposits into the other inside one transaction: the
//! runtime commits both or neither (two-phase commit when they are on different nodes),
//! so money is never created or lost, whichever node fails when. `total` reads the
//! totals of several banks in one transaction: a consistent sum across them.
//!
//! This function keeps no state of its own.
//!
//! | method | input | output | errors |
//! |---|---|---|---|
//! | `transfer` | `{"from": {"bank": "bank-east", "account": "alice"}, "to": {"bank": "bank-west", "account": "bob"}, "amount": 5}` | `{"from_balance": 95, "to_balance": 5}` | the banks' own: `no-account`, `overdraft`, `overflow`, `bad-input`; `bad-input` (the same account on both sides) |
//! | `total` | `{"banks": ["bank-east", "bank-west"]}` | `{"total": 200, "accounts": 4}` | `bad-input` (no banks), `overflow` |
//!
//! Errors of the host (`unknown-function` for a bank that is not deployed) pass through.

use serde::{Deserialize, Serialize};
use understudy_sdk::{call, Error, Result};

understudy_sdk::function! {
    "transfer" => transfer,
    "total" => total,
}

#[derive(Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Account {
    bank: String,
    account: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferArgs {
    from: Account,
    to: Account,
    amount: u64,
}

#[derive(Serialize)]
struct Amount<'a> {
    account: &'a str,
    amount: u64,
}

/// What a bank's `deposit` and `withdraw` answer.
#[derive(Deserialize)]
struct Balance {
    balance: u64,
}

#[derive(Serialize)]
struct Transferred {
    from_balance: u64,
    to_balance: u64,
}

fn transfer(args: TransferArgs) -> Result<Transferred> {
    if args.from == args.to {
        return Err(Error::bad_input("from and to are the same account"));
    }
    // The withdrawal checks the balance; if the deposit then fails, the error aborts the
    // whole transaction and the withdrawal with it.
    let from: Balance = call::invoke(
        &args.from.bank,
        "withdraw",
        &Amount {
            account: &args.from.account,
            amount: args.amount,
        },
    )?;
    let to: Balance = call::invoke(
        &args.to.bank,
        "deposit",
        &Amount {
            account: &args.to.account,
            amount: args.amount,
        },
    )?;
    Ok(Transferred {
        from_balance: from.balance,
        to_balance: to.balance,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TotalArgs {
    banks: Vec<String>,
}

/// What a bank's `total` answers.
#[derive(Deserialize, Serialize, Default)]
struct Total {
    total: u64,
    accounts: u64,
}

fn total(args: TotalArgs) -> Result<Total> {
    if args.banks.is_empty() {
        return Err(Error::bad_input("name at least one bank"));
    }
    let mut sum = Total::default();
    for bank in &args.banks {
        let t: Total = call::invoke(bank, "total", &())?;
        sum.total = sum
            .total
            .checked_add(t.total)
            .ok_or_else(|| Error::new("overflow", "the total does not fit in 64 bits"))?;
        sum.accounts += t.accounts;
    }
    Ok(sum)
}
