//! A checker of list-append histories (the workload of the `lists` test guest), in the
//! manner of Jepsen's Elle: every append is a unique integer, so each read of a list
//! reveals the order of every append to that key, and each transaction's reads tell
//! which transactions it saw. From those the checker builds the dependency graph of the
//! transactions that committed, with
//!
//! - `ww`: T1 appended the element just before T2's in a key's order;
//! - `wr`: T2 read a list whose last element T1 appended;
//! - `rw`: T1 read a list of length n and T2 appended element n + 1;
//! - `rt`: T1 was answered before T2 was sent (real time; what makes it *strict*),
//!
//! and reports a cycle, which is an anomaly (a G0/G1c/G2 cycle, or a stale read when a
//! real-time edge is in it). Before that it checks what needs no graph: no read holds an
//! element twice or one nobody appended, the reads of a key are prefixes of one order,
//! and every acknowledged append is in the final read of its key (nothing acknowledged
//! lost). Strict serializability implies linearizability of each key.
//!
//! Transactions that never got an answer may or may not have committed: they count as
//! committed when an element they appended was read, and have no real-time successors.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub enum Op {
    Append(String, u64),
    /// The list read (`None` until answered).
    Read(String, Option<Vec<u64>>),
}

#[derive(Clone, Debug, Serialize)]
pub struct Txn {
    /// Which function ran it: keys of different functions are different objects.
    pub function: String,
    pub ops: Vec<Op>,
    /// Milliseconds since the run began: sent, and answered (`None`: no answer).
    pub sent: f64,
    pub answered: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub transactions: usize,
    pub answered: usize,
    pub appends_checked: usize,
    pub reads_checked: usize,
    pub edges: usize,
    pub anomalies: Vec<String>,
}

type Key = (String, String);

/// Check `history`, which should end with a read of every key made once every fault
/// was healed (the state each key ended in: an acknowledged append missing there was
/// lost).
pub fn check(history: &[Txn]) -> Report {
    let mut report = Report {
        transactions: history.len(),
        answered: history.iter().filter(|t| t.answered.is_some()).count(),
        ..Report::default()
    };
    // Who appended each element.
    let mut writer: HashMap<(Key, u64), usize> = HashMap::new();
    for (i, t) in history.iter().enumerate() {
        for op in &t.ops {
            if let Op::Append(k, v) = op {
                let key = (t.function.clone(), k.clone());
                if writer.insert((key, *v), i).is_some() {
                    report.anomalies.push(format!(
                        "element {v} of {}/{k} appended twice by the workload",
                        t.function
                    ));
                }
            }
        }
    }
    // The longest read of each key is its order; every other read must be a prefix.
    let mut order: BTreeMap<Key, Vec<u64>> = BTreeMap::new();
    for t in history.iter().filter(|t| t.answered.is_some()) {
        for op in &t.ops {
            if let Op::Read(k, Some(list)) = op {
                report.reads_checked += 1;
                let key = (t.function.clone(), k.clone());
                let mut seen = std::collections::HashSet::new();
                for v in list {
                    if !seen.insert(*v) {
                        report.anomalies.push(format!(
                            "a read of {}/{k} holds {v} twice: {list:?}",
                            t.function
                        ));
                    }
                    if !writer.contains_key(&(key.clone(), *v)) {
                        report.anomalies.push(format!(
                            "a read of {}/{k} holds {v}, which nobody appended",
                            t.function
                        ));
                    }
                }
                let longest = order.entry(key).or_default();
                let (short, long) = if list.len() > longest.len() {
                    (longest.as_slice(), list.as_slice())
                } else {
                    (list.as_slice(), longest.as_slice())
                };
                if long[..short.len()] != *short {
                    report.anomalies.push(format!(
                        "reads of {}/{k} disagree on its order: {short:?} is not a prefix of {long:?}",
                        t.function
                    ));
                }
                if list.len() > longest.len() {
                    *longest = list.clone();
                }
            }
        }
    }
    // Nothing acknowledged lost: every answered append is in its key's order.
    for t in history.iter().filter(|t| t.answered.is_some()) {
        for op in &t.ops {
            if let Op::Append(k, v) = op {
                report.appends_checked += 1;
                let key = (t.function.clone(), k.clone());
                if !order.get(&key).is_some_and(|o| o.contains(v)) {
                    report.anomalies.push(format!(
                        "acknowledged append of {v} to {}/{k} is missing from every read",
                        t.function
                    ));
                }
            }
        }
    }
    // Committed: answered, or seen.
    let committed: Vec<bool> = {
        let mut c: Vec<bool> = history.iter().map(|t| t.answered.is_some()).collect();
        for (key, list) in &order {
            for v in list {
                if let Some(w) = writer.get(&(key.clone(), *v)) {
                    c[*w] = true;
                }
            }
        }
        c
    };
    let mut graph = Graph::new(history.len());
    for (key, list) in &order {
        let by = |v: &u64| writer.get(&(key.clone(), *v)).copied();
        for pair in list.windows(2) {
            if let (Some(a), Some(b)) = (by(&pair[0]), by(&pair[1])) {
                graph.edge(a, b, "ww");
            }
        }
        for (r, t) in history.iter().enumerate() {
            if t.answered.is_none() || t.function != key.0 {
                continue;
            }
            for op in &t.ops {
                let Op::Read(k, Some(read)) = op else {
                    continue;
                };
                if *k != key.1 {
                    continue;
                }
                if let Some(w) = read.last().and_then(by) {
                    graph.edge(w, r, "wr");
                }
                if let Some(w) = list.get(read.len()).and_then(by) {
                    graph.edge(r, w, "rw");
                }
            }
        }
    }
    // Real time, through a chain of barriers (one per answer, in time order) instead of
    // an edge per pair: T1 -> barrier(T1's answer) -> ... -> last barrier before T2 was
    // sent -> T2.
    let mut answers: Vec<(f64, usize)> = history
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.answered.map(|a| (a, i)))
        .collect();
    answers.sort_by(|a, b| a.0.total_cmp(&b.0));
    let barrier0 = graph.add_nodes(answers.len());
    for (j, (_, t)) in answers.iter().enumerate() {
        graph.edge(*t, barrier0 + j, "rt");
        if j + 1 < answers.len() {
            graph.edge(barrier0 + j, barrier0 + j + 1, "rt");
        }
    }
    for (i, t) in history.iter().enumerate() {
        if !committed[i] {
            continue;
        }
        let before = answers.partition_point(|(a, _)| *a < t.sent);
        if before > 0 {
            graph.edge(barrier0 + before - 1, i, "rt");
        }
    }
    report.edges = graph.edges;
    if let Some(cycle) = graph.cycle(history.len()) {
        let steps: Vec<String> = cycle
            .iter()
            .map(|(node, kind)| match history.get(*node) {
                Some(t) => format!("{kind} -> T{node} {}:{:?}", t.function, t.ops),
                None => format!("{kind} -> (time)"),
            })
            .collect();
        report
            .anomalies
            .push(format!("a dependency cycle: {}", steps.join(" ")));
    }
    report
}

struct Graph {
    out: Vec<Vec<(usize, &'static str)>>,
    edges: usize,
}

impl Graph {
    fn new(nodes: usize) -> Graph {
        Graph {
            out: vec![Vec::new(); nodes],
            edges: 0,
        }
    }

    /// Add `n` nodes; returns the first one's index.
    fn add_nodes(&mut self, n: usize) -> usize {
        let first = self.out.len();
        self.out.resize(first + n, Vec::new());
        first
    }

    fn edge(&mut self, from: usize, to: usize, kind: &'static str) {
        if from != to {
            self.out[from].push((to, kind));
            self.edges += 1;
        }
    }

    /// A cycle through at least one transaction (nodes below `transactions`), as the
    /// nodes along it with the kind of edge into each; iterative DFS.
    fn cycle(&self, transactions: usize) -> Option<Vec<(usize, &'static str)>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Open,
            Done,
        }
        let mut mark = vec![Mark::New; self.out.len()];
        let mut via: Vec<(usize, &'static str)> = vec![(usize::MAX, ""); self.out.len()];
        for start in 0..self.out.len() {
            if mark[start] != Mark::New {
                continue;
            }
            let mut stack = vec![(start, 0usize)];
            mark[start] = Mark::Open;
            while let Some((node, next)) = stack.last_mut() {
                let node = *node;
                if let Some(&(to, kind)) = self.out[node].get(*next) {
                    *next += 1;
                    match mark[to] {
                        Mark::New => {
                            mark[to] = Mark::Open;
                            via[to] = (node, kind);
                            stack.push((to, 0));
                        }
                        Mark::Open => {
                            let mut cycle = vec![(to, kind)];
                            let mut at = node;
                            while at != to {
                                cycle.push((at, via[at].1));
                                at = via[at].0;
                            }
                            cycle.reverse();
                            if cycle.iter().any(|(n, _)| *n < transactions) {
                                return Some(cycle);
                            }
                        }
                        Mark::Done => {}
                    }
                } else {
                    mark[node] = Mark::Done;
                    stack.pop();
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(ops: Vec<Op>, sent: f64, answered: Option<f64>) -> Txn {
        Txn {
            function: "f".into(),
            ops,
            sent,
            answered,
        }
    }
    fn append(k: &str, v: u64) -> Op {
        Op::Append(k.into(), v)
    }
    fn read(k: &str, list: &[u64]) -> Op {
        Op::Read(k.into(), Some(list.to_vec()))
    }

    #[test]
    fn a_serial_history_passes() {
        let h = vec![
            txn(vec![append("x", 1), append("y", 2)], 0.0, Some(1.0)),
            txn(vec![read("x", &[1]), append("x", 3)], 2.0, Some(3.0)),
            txn(vec![read("x", &[1, 3]), read("y", &[2])], 4.0, Some(5.0)),
        ];
        let r = check(&h);
        assert!(r.anomalies.is_empty(), "{:?}", r.anomalies);
        assert_eq!(r.appends_checked, 3);
    }

    #[test]
    fn a_lost_acknowledged_append_is_found() {
        let h = vec![
            txn(vec![append("x", 1)], 0.0, Some(1.0)),
            txn(vec![append("x", 2)], 2.0, Some(3.0)),
            txn(vec![read("x", &[1])], 4.0, Some(5.0)),
        ];
        let r = check(&h);
        assert!(
            r.anomalies
                .iter()
                .any(|a| a.contains("append of 2") && a.contains("missing")),
            "{:?}",
            r.anomalies
        );
    }

    #[test]
    fn a_stale_read_is_a_real_time_cycle() {
        // The append was answered before the read was sent, yet the read misses it.
        let h = vec![
            txn(vec![append("x", 1)], 0.0, Some(1.0)),
            txn(vec![read("x", &[])], 2.0, Some(3.0)),
            txn(vec![read("x", &[1])], 4.0, Some(5.0)),
        ];
        let r = check(&h);
        assert!(
            r.anomalies
                .iter()
                .any(|a| a.contains("cycle") && a.contains("rt")),
            "{:?}",
            r.anomalies
        );
    }

    #[test]
    fn write_skew_across_keys_is_a_cycle() {
        // Concurrent: T1 reads y empty and appends x; T2 reads x empty and appends y;
        // both committed (G2, no serial order explains both reads).
        let h = vec![
            txn(vec![read("y", &[]), append("x", 1)], 0.0, Some(5.0)),
            txn(vec![read("x", &[]), append("y", 2)], 0.0, Some(5.0)),
            txn(vec![read("x", &[1]), read("y", &[2])], 6.0, Some(7.0)),
        ];
        let r = check(&h);
        assert!(
            r.anomalies
                .iter()
                .any(|a| a.contains("cycle") && a.contains("rw")),
            "{:?}",
            r.anomalies
        );
    }

    #[test]
    fn divergent_orders_and_phantom_elements_are_found() {
        let h = vec![
            txn(vec![append("x", 1)], 0.0, Some(1.0)),
            txn(vec![append("x", 2)], 0.0, Some(1.0)),
            txn(vec![read("x", &[1, 2])], 2.0, Some(3.0)),
            txn(vec![read("x", &[2, 1, 9])], 2.0, Some(3.0)),
        ];
        let r = check(&h);
        assert!(
            r.anomalies.iter().any(|a| a.contains("disagree")),
            "{:?}",
            r.anomalies
        );
        assert!(
            r.anomalies.iter().any(|a| a.contains("nobody appended")),
            "{:?}",
            r.anomalies
        );
    }

    #[test]
    fn an_unanswered_append_may_or_may_not_have_happened() {
        let h = vec![
            txn(vec![append("x", 1)], 0.0, None),
            txn(vec![append("x", 2)], 0.0, None),
            txn(vec![read("x", &[2])], 2.0, Some(3.0)),
        ];
        let r = check(&h);
        assert!(r.anomalies.is_empty(), "{:?}", r.anomalies);
    }
}
