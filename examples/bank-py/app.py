"""A bank, in Python: the same methods, state layout and errors as the Rust bank
(``examples/bank``), so the two are interchangeable behind one name.

State: one key per account, ``acct/<account>``, holding its balance as a JSON number.
Amounts and balances are unsigned 64-bit integers; an account name is 1 to 256 bytes.

=========  ==============================================  =================================
method     input                                           output
=========  ==============================================  =================================
open       {"account": "alice", "initial": 100}            {"account": "alice", "balance": 100}
deposit    {"account": "alice", "amount": 5}               {"account": "alice", "balance": 105}
withdraw   {"account": "alice", "amount": 5}               {"account": "alice", "balance": 95}
transfer   {"from": "alice", "to": "bob", "amount": 5}     {"from_balance": 95, "to_balance": 5}
balance    {"account": "alice"}                            {"account": "alice", "balance": 100}
total      anything (ignored)                              {"total": 105, "accounts": 2}
=========  ==============================================  =================================

Errors: ``exists``, ``no-account``, ``overdraft``, ``overflow``, and ``bad-input`` for
input that does not fit (missing or unknown fields, negative or zero amounts, a
transfer to the same account).
"""

import json

import understudy
from understudy import Fail, state

ACCOUNT_PREFIX = "acct/"
ACCOUNT_LEN_MAX = 256
U64_MAX = 2**64 - 1
# Accounts read per scan in `total`; the host may cap it lower.
TOTAL_PAGE_LEN = 1000


@understudy.method("open")
def open_account(args):
    account, initial = fields(args, required={"account": str}, optional={"initial": 0})
    key = account_key(account)
    if state.get_bytes(key) is not None:
        raise Fail("exists", f"account {quote(account)} is already open")
    state.put(key, initial)
    return {"account": account, "balance": initial}


@understudy.method("deposit")
def deposit(args):
    account, amount = fields(args, required={"account": str, "amount": int})
    require_amount(amount)
    balance = credit(account, read_balance(account), amount)
    write_balance(account, balance)
    return {"account": account, "balance": balance}


@understudy.method("withdraw")
def withdraw(args):
    account, amount = fields(args, required={"account": str, "amount": int})
    require_amount(amount)
    balance = debit(account, read_balance(account), amount)
    write_balance(account, balance)
    return {"account": account, "balance": balance}


@understudy.method("transfer")
def transfer(args):
    source, target, amount = fields(args, required={"from": str, "to": str, "amount": int})
    require_amount(amount)
    if source == target:
        raise Fail("bad-input", f"cannot transfer from account {quote(source)} to itself")
    from_balance = read_balance(source)
    to_balance = read_balance(target)
    from_balance = debit(source, from_balance, amount)
    to_balance = credit(target, to_balance, amount)
    write_balance(source, from_balance)
    write_balance(target, to_balance)
    return {"from_balance": from_balance, "to_balance": to_balance}


@understudy.method("balance")
def balance(args):
    (account,) = fields(args, required={"account": str})
    return {"account": account, "balance": read_balance(account)}


@understudy.method("total")
def total(_args):
    """Sums every account, a page of scan at a time."""
    end = state.prefix_end(ACCOUNT_PREFIX)
    start = ACCOUNT_PREFIX.encode()
    result = {"total": 0, "accounts": 0}
    while True:
        # The host may cap the page below TOTAL_PAGE_LEN, so only an empty page means
        # the end.
        page = state.scan(start, end, TOTAL_PAGE_LEN)
        if not page:
            return result
        start = state.key_after(page[-1][0])
        for _key, value in page:
            result["total"] += value
            if result["total"] > U64_MAX:
                raise Fail("overflow", "the total overflows u64")
            result["accounts"] += 1


def fields(args, required, optional=None):
    """The values of ``args``' fields in the order given: ``required`` maps names to
    types, ``optional`` names to defaults (of the default's type). Integers must be
    unsigned 64-bit. Anything missing, extra or of another type is ``bad-input``. A
    list is read as the values in that order, as the Rust bank (serde) reads it."""
    optional = optional or {}
    names = [*required, *optional]
    if isinstance(args, list):
        # As serde reads a struct from a sequence: the fields in order, the optional
        # ones at the end may be left out.
        if not len(required) <= len(args) <= len(names):
            raise Fail("bad-input", f"expected {len(required)} to {len(names)} values, not {len(args)}")
        args = dict(zip(names, args))
    if not isinstance(args, dict):
        raise Fail("bad-input", f"expected an object with fields {', '.join(names)}")
    unknown = sorted(set(args) - set(required) - set(optional))
    if unknown:
        raise Fail("bad-input", f"unknown field `{unknown[0]}`")
    values = []
    for name, kind in [*required.items(), *((n, type(d)) for n, d in optional.items())]:
        if name not in args:
            if name in required:
                raise Fail("bad-input", f"missing field `{name}`")
            values.append(optional[name])
            continue
        value = args[name]
        # bool is an int in Python, not in JSON.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise Fail("bad-input", f"field `{name}` must be a {kind.__name__}")
        if kind is int and not 0 <= value <= U64_MAX:
            raise Fail("bad-input", f"field `{name}` must be an unsigned 64-bit integer")
        values.append(value)
    return values


def quote(text):
    """``text`` quoted as the Rust bank's messages quote it."""
    return json.dumps(text, ensure_ascii=False)


def account_key(account):
    length = len(account.encode())
    if not 1 <= length <= ACCOUNT_LEN_MAX:
        raise Fail("bad-input", f"an account name is 1 to {ACCOUNT_LEN_MAX} bytes, not {length}")
    return ACCOUNT_PREFIX + account


def require_amount(amount):
    if amount == 0:
        raise Fail("bad-input", "the amount must be positive")


def read_balance(account):
    balance = state.get(account_key(account))
    if balance is None:
        raise Fail("no-account", f"no account {quote(account)}")
    return balance


def write_balance(account, balance):
    state.put(account_key(account), balance)


def credit(account, balance, amount):
    if balance + amount > U64_MAX:
        raise Fail("overflow", f"crediting {amount} to account {quote(account)} overflows its balance")
    return balance + amount


def debit(account, balance, amount):
    if balance < amount:
        raise Fail("overdraft", f"account {quote(account)} holds {balance}, less than {amount}")
    return balance - amount


# componentize-py looks for the export's class by name in this module.
Handler = understudy.Handler
