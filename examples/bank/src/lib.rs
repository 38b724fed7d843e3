//! A bank: accounts with balances, deposits, withdrawals, transfers, and a total that
//! transfers conserve. Every method is one transaction, so a transfer that fails
//! leaves both balances as they were.
//!
//! State: one key per account, `acct/<account>`, holding its balance as a JSON number.
//! Amounts and balances are `u64`. An account name is 1 to 256 bytes.
//!
//! | method | input | output | errors |
//! |---|---|---|---|
//! | `open` | `{"account": "alice", "initial": 100}` (`initial` defaults to 0) | `{"account": "alice", "balance": 100}` | `exists`, `bad-input` |
//! | `deposit` | `{"account": "alice", "amount": 5}` | `{"account": "alice", "balance": 105}` | `no-account`, `bad-input` (amount 0), `overflow` |
//! | `withdraw` | `{"account": "alice", "amount": 5}` | `{"account": "alice", "balance": 95}` | `no-account`, `overdraft`, `bad-input` (amount 0) |
//! | `transfer` | `{"from": "alice", "to": "bob", "amount": 5}` | `{"from_balance": 95, "to_balance": 5}` | `no-account`, `overdraft`, `overflow`, `bad-input` (same account, amount 0) |
//! | `balance` | `{"account": "alice"}` | `{"account": "alice", "balance": 100}` | `no-account` |
//! | `total` | anything (ignored; send none or `null`) | `{"total": 105, "accounts": 2}` | `overflow` |
//!
//! Input that does not parse (missing or unknown fields, negative amounts) fails with
//! `bad-input`.

use serde::{Deserialize, Serialize};
use understudy_sdk::{state, Error, Result};

understudy_sdk::function! {
    "open" => open,
    "deposit" => deposit,
    "withdraw" => withdraw,
    "transfer" => transfer,
    "balance" => balance,
    "total" => total,
}

const ACCOUNT_PREFIX: &str = "acct/";
const ACCOUNT_LEN_MAX: usize = 256;
/// Accounts read per scan in `total`; the host may cap it lower.
const TOTAL_PAGE_LEN: u32 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenArgs {
    account: String,
    #[serde(default)]
    initial: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AmountArgs {
    account: String,
    amount: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferArgs {
    from: String,
    to: String,
    amount: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountArgs {
    account: String,
}

#[derive(Serialize)]
struct Balance {
    account: String,
    balance: u64,
}

#[derive(Serialize)]
struct Transferred {
    from_balance: u64,
    to_balance: u64,
}

#[derive(Serialize)]
struct Total {
    total: u64,
    accounts: u64,
}

fn open(args: OpenArgs) -> Result<Balance> {
    let key = account_key(&args.account)?;
    if state::get_bytes(&key)?.is_some() {
        return Err(Error::new(
            "exists",
            format!("account {:?} is already open", args.account),
        ));
    }
    state::put(&key, &args.initial)?;
    Ok(Balance {
        account: args.account,
        balance: args.initial,
    })
}

fn deposit(args: AmountArgs) -> Result<Balance> {
    require_amount(args.amount)?;
    let balance = read_balance(&args.account)?;
    let balance = credit(&args.account, balance, args.amount)?;
    write_balance(&args.account, balance)?;
    Ok(Balance {
        account: args.account,
        balance,
    })
}

fn withdraw(args: AmountArgs) -> Result<Balance> {
    require_amount(args.amount)?;
    let balance = read_balance(&args.account)?;
    let balance = debit(&args.account, balance, args.amount)?;
    write_balance(&args.account, balance)?;
    Ok(Balance {
        account: args.account,
        balance,
    })
}

fn transfer(args: TransferArgs) -> Result<Transferred> {
    require_amount(args.amount)?;
    if args.from == args.to {
        return Err(Error::bad_input(format!(
            "cannot transfer from account {:?} to itself",
            args.from
        )));
    }
    let from_balance = read_balance(&args.from)?;
    let to_balance = read_balance(&args.to)?;
    let from_balance = debit(&args.from, from_balance, args.amount)?;
    let to_balance = credit(&args.to, to_balance, args.amount)?;
    write_balance(&args.from, from_balance)?;
    write_balance(&args.to, to_balance)?;
    Ok(Transferred {
        from_balance,
        to_balance,
    })
}

fn balance(args: AccountArgs) -> Result<Balance> {
    let balance = read_balance(&args.account)?;
    Ok(Balance {
        account: args.account,
        balance,
    })
}

/// Sums every account, a page of scan at a time.
fn total(_: serde::de::IgnoredAny) -> Result<Total> {
    let end = state::prefix_end(ACCOUNT_PREFIX.as_bytes());
    let mut start = ACCOUNT_PREFIX.as_bytes().to_vec();
    let mut total = Total {
        total: 0,
        accounts: 0,
    };
    loop {
        // The host may cap the page below TOTAL_PAGE_LEN, so only an empty page
        // means the end.
        let page = state::scan::<u64>(&start, end.as_deref(), TOTAL_PAGE_LEN)?;
        let Some((last, _)) = page.last() else {
            return Ok(total);
        };
        start = state::key_after(last);
        for (_, balance) in &page {
            total.total = total
                .total
                .checked_add(*balance)
                .ok_or_else(|| Error::new("overflow", "the total overflows u64"))?;
            total.accounts += 1;
        }
    }
}

fn account_key(account: &str) -> Result<String> {
    if account.is_empty() || account.len() > ACCOUNT_LEN_MAX {
        return Err(Error::bad_input(format!(
            "an account name is 1 to {ACCOUNT_LEN_MAX} bytes, not {}",
            account.len()
        )));
    }
    Ok(format!("{ACCOUNT_PREFIX}{account}"))
}

fn require_amount(amount: u64) -> Result<()> {
    if amount == 0 {
        return Err(Error::bad_input("the amount must be positive"));
    }
    Ok(())
}

fn read_balance(account: &str) -> Result<u64> {
    state::get(account_key(account)?)?
        .ok_or_else(|| Error::new("no-account", format!("no account {account:?}")))
}

fn write_balance(account: &str, balance: u64) -> Result<()> {
    state::put(account_key(account)?, &balance)
}

fn credit(account: &str, balance: u64, amount: u64) -> Result<u64> {
    balance.checked_add(amount).ok_or_else(|| {
        Error::new(
            "overflow",
            format!("crediting {amount} to account {account:?} overflows its balance"),
        )
    })
}

fn debit(account: &str, balance: u64, amount: u64) -> Result<u64> {
    balance.checked_sub(amount).ok_or_else(|| {
        Error::new(
            "overdraft",
            format!("account {account:?} holds {balance}, less than {amount}"),
        )
    })
}
