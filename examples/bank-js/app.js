// A bank, in JavaScript: the same methods, state layout and errors as the Rust bank
// (`examples/bank`), so the two are interchangeable behind one name.
//
// State: one key per account, `acct/<account>`, holding its balance as a JSON number.
// An account name is 1 to 256 bytes.
//
// | method | input | output |
// |---|---|---|
// | `open` | `{"account": "alice", "initial": 100}` | `{"account": "alice", "balance": 100}` |
// | `deposit` | `{"account": "alice", "amount": 5}` | `{"account": "alice", "balance": 105}` |
// | `withdraw` | `{"account": "alice", "amount": 5}` | `{"account": "alice", "balance": 95}` |
// | `transfer` | `{"from": "alice", "to": "bob", "amount": 5}` | `{"from_balance": 95, "to_balance": 5}` |
// | `balance` | `{"account": "alice"}` | `{"account": "alice", "balance": 100}` |
// | `total` | anything (ignored) | `{"total": 105, "accounts": 2}` |
//
// Errors: `exists`, `no-account`, `overdraft`, `overflow`, and `bad-input` for input
// that does not fit (missing or unknown fields, negative or zero amounts, a transfer to
// the same account).
//
// One difference from the Rust bank: JavaScript numbers are exact only up to 2^53 - 1
// (Number.MAX_SAFE_INTEGER), so amounts and balances stop there, not at 2^64 - 1: a
// larger amount is `bad-input` and a balance that would pass it is `overflow`.

import { handle, state, prefixEnd, keyAfter, Fail } from '../../sdk/js/understudy.js';

const ACCOUNT_PREFIX = 'acct/';
const ACCOUNT_LEN_MAX = 256;
const AMOUNT_MAX = Number.MAX_SAFE_INTEGER;
// Accounts read per scan in `total`; the host may cap it lower.
const TOTAL_PAGE_LEN = 1000;

function open(args) {
  const [account, initial] = fields(args, { account: 'string' }, { initial: 0 });
  const key = accountKey(account);
  if (state.getBytes(key) !== undefined) {
    throw new Fail('exists', `account ${JSON.stringify(account)} is already open`);
  }
  state.put(key, initial);
  return { account, balance: initial };
}

function deposit(args) {
  const [account, amount] = fields(args, { account: 'string', amount: 'integer' });
  requireAmount(amount);
  const balance = credit(account, readBalance(account), amount);
  writeBalance(account, balance);
  return { account, balance };
}

function withdraw(args) {
  const [account, amount] = fields(args, { account: 'string', amount: 'integer' });
  requireAmount(amount);
  const balance = debit(account, readBalance(account), amount);
  writeBalance(account, balance);
  return { account, balance };
}

function transfer(args) {
  const [from, to, amount] = fields(args, { from: 'string', to: 'string', amount: 'integer' });
  requireAmount(amount);
  if (from === to) {
    throw new Fail('bad-input', `cannot transfer from account ${JSON.stringify(from)} to itself`);
  }
  const fromBefore = readBalance(from);
  const toBefore = readBalance(to);
  const fromBalance = debit(from, fromBefore, amount);
  const toBalance = credit(to, toBefore, amount);
  writeBalance(from, fromBalance);
  writeBalance(to, toBalance);
  return { from_balance: fromBalance, to_balance: toBalance };
}

function balance(args) {
  const [account] = fields(args, { account: 'string' });
  return { account, balance: readBalance(account) };
}

// Sums every account, a page of scan at a time.
function total() {
  const end = prefixEnd(ACCOUNT_PREFIX);
  let start = ACCOUNT_PREFIX;
  const result = { total: 0, accounts: 0 };
  for (;;) {
    // The host may cap the page below TOTAL_PAGE_LEN, so only an empty page means the
    // end.
    const page = state.scan(start, end, TOTAL_PAGE_LEN);
    if (page.length === 0) return result;
    start = keyAfter(page[page.length - 1][0]);
    for (const [, value] of page) {
      result.total += value;
      if (result.total > AMOUNT_MAX) throw new Fail('overflow', `the total passes ${AMOUNT_MAX}`);
      result.accounts += 1;
    }
  }
}

// The values of `args`' fields in the order given: `required` maps names to kinds
// ('string' or 'integer'), `optional` names to defaults. Integers are whole numbers
// from 0 to AMOUNT_MAX. Anything missing, extra or of another kind is `bad-input`. An
// array is read as the values in that order, as the Rust bank (serde) reads it.
function fields(args, required, optional = {}) {
  const names = [...Object.keys(required), ...Object.keys(optional)];
  if (Array.isArray(args)) {
    // As serde reads a struct from a sequence: the fields in order, the optional ones
    // at the end may be left out.
    const least = Object.keys(required).length;
    if (args.length < least || args.length > names.length) {
      throw new Fail('bad-input', `expected ${least} to ${names.length} values, not ${args.length}`);
    }
    args = Object.fromEntries(args.map((value, i) => [names[i], value]));
  }
  if (args === null || typeof args !== 'object') {
    throw new Fail('bad-input', `expected an object with fields ${names.join(', ')}`);
  }
  const unknown = Object.keys(args).filter((k) => !(k in required) && !(k in optional));
  if (unknown.length > 0) throw new Fail('bad-input', `unknown field \`${unknown[0]}\``);
  const kinds = { ...required };
  for (const [name, fallback] of Object.entries(optional)) {
    kinds[name] = typeof fallback === 'number' ? 'integer' : typeof fallback;
  }
  return Object.entries(kinds).map(([name, kind]) => {
    if (!(name in args)) {
      if (name in required) throw new Fail('bad-input', `missing field \`${name}\``);
      return optional[name];
    }
    const value = args[name];
    const ok = kind === 'integer'
      ? Number.isSafeInteger(value) && value >= 0
      : typeof value === kind;
    if (!ok) {
      const want = kind === 'integer' ? `a whole number from 0 to ${AMOUNT_MAX}` : `a ${kind}`;
      throw new Fail('bad-input', `field \`${name}\` must be ${want}`);
    }
    return value;
  });
}

function accountKey(account) {
  const length = new TextEncoder().encode(account).length;
  if (length < 1 || length > ACCOUNT_LEN_MAX) {
    throw new Fail('bad-input', `an account name is 1 to ${ACCOUNT_LEN_MAX} bytes, not ${length}`);
  }
  return ACCOUNT_PREFIX + account;
}

function requireAmount(amount) {
  if (amount === 0) throw new Fail('bad-input', 'the amount must be positive');
}

function readBalance(account) {
  const value = state.get(accountKey(account));
  if (value === null) throw new Fail('no-account', `no account ${JSON.stringify(account)}`);
  return value;
}

function writeBalance(account, value) {
  state.put(accountKey(account), value);
}

function credit(account, value, amount) {
  if (value + amount > AMOUNT_MAX) {
    throw new Fail('overflow', `crediting ${amount} to account ${JSON.stringify(account)} overflows its balance`);
  }
  return value + amount;
}

function debit(account, value, amount) {
  if (value < amount) {
    throw new Fail('overdraft', `account ${JSON.stringify(account)} holds ${value}, less than ${amount}`);
  }
  return value - amount;
}

// componentize-js looks for the export `handler` (the WIT interface's name).
export const handler = handle({ open, deposit, withdraw, transfer, balance, total });
