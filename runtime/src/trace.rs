//! An invocation's trace: its W3C trace context (`traceparent`), taken from the request
//! or started at the HTTP edge, and the `tracing` spans that carry it through this node.
//!
//! Every span of an invocation has the target [`TARGET`]; the first span of it on each
//! node (the edge's, or the one serving a forwarded invocation, a call from another node
//! or a two-phase-commit message) has a `trace_id` field, so every log line inside
//! shows it, and holds the context itself (in the span's extensions). Code
//! that sends an invocation to another node asks for [`outgoing`] and puts it on the
//! wire message; the receiving node starts its spans under it ([`remote_span`]).
//!
//! Exporting the spans (OpenTelemetry over OTLP) is the binary's business: it installs
//! a `tracing-opentelemetry` layer and calls [`set_exporting`]. Then each root span is
//! also given the remote parent, and [`outgoing`] names the current exported span, so
//! the spans of every node form one tree. Without an exporter no OpenTelemetry code runs.
//!
//! A malformed `traceparent` is ignored: the invocation starts a new trace.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::Span;
use tracing_subscriber::registry::LookupSpan;

/// The `tracing` target of every span of an invocation's trace.
pub const TARGET: &str = "understudy_trace";

/// The W3C header an invocation's trace context travels in.
pub const HEADER: &str = "traceparent";

/// A span inside an invocation's trace on this node (`guest.run`, `commit`, ...): for
/// export only. Without an exporter it is `Span::none()`, which costs nothing: the log
/// lines inside still show the invocation's first span on the node, with its trace id.
macro_rules! inner_span {
    ($name:literal $(, $($fields:tt)*)?) => {
        if $crate::trace::exporting() {
            tracing::info_span!(target: $crate::trace::TARGET, $name $(, $($fields)*)?)
        } else {
            tracing::Span::none()
        }
    };
}
pub(crate) use inner_span;

/// The `[traces]` settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Export the invocations' spans to this OpenTelemetry collector, over OTLP
    /// (HTTP, protobuf): its base URL, such as `http://127.0.0.1:4318` (`/v1/traces` is
    /// added). Unset, the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, used as is) is read; with neither, nothing
    /// is exported.
    pub otlp_endpoint: Option<String>,
}

/// Whether spans are exported (a `tracing-opentelemetry` layer is installed).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// A W3C trace context: the trace, the span that sent it, and whether it is sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

/// 16 bytes, never all zero; written as 32 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// 8 bytes, never all zero; written as 16 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl TraceContext {
    /// Parse a `traceparent` header: `VERSION-TRACEID-SPANID-FLAGS`, lowercase hex.
    /// Version `00` must be exactly that; a later version may add fields after the
    /// flags (as the W3C spec says a reader of `00` accepts). Returns `None` for
    /// anything else, for version `ff`, and for an all-zero trace or span id.
    pub fn parse(header: &str) -> Option<TraceContext> {
        let lower_hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let mut fields = header.split('-');
        let version = fields.next()?;
        let trace = fields.next()?;
        let span = fields.next()?;
        let flags = fields.next()?;
        let rest_ok = match version {
            "00" => fields.next().is_none(),
            "ff" => false,
            v => v.len() == 2 && lower_hex(v),
        };
        let flags_ok = flags.len() == 2 || (version != "00" && flags.len() >= 2);
        if !rest_ok
            || !flags_ok
            || trace.len() != 32
            || span.len() != 16
            || ![trace, span, &flags[..2]].iter().all(|s| lower_hex(s))
        {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        hex::decode_to_slice(span, &mut span_id).ok()?;
        let flags = u8::from_str_radix(&flags[..2], 16).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id: TraceId(trace_id),
            span_id: SpanId(span_id),
            sampled: flags & 1 == 1,
        })
    }

    /// A new trace, sampled.
    pub fn new_root() -> TraceContext {
        TraceContext {
            trace_id: TraceId(nonzero_u128().to_be_bytes()),
            span_id: new_span_id(),
            sampled: true,
        }
    }

    /// The same trace, from a new span.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: new_span_id(),
            ..*self
        }
    }

    /// The `traceparent` header (version 00).
    pub fn to_header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

fn nonzero_u128() -> u128 {
    loop {
        let v = fastrand::u128(..);
        if v != 0 {
            return v;
        }
    }
}

fn new_span_id() -> SpanId {
    loop {
        let v = fastrand::u64(..);
        if v != 0 {
            return SpanId(v.to_be_bytes());
        }
    }
}

/// Say that a `tracing-opentelemetry` layer exports this process's spans (the binary
/// calls it once, when it installs the layer).
pub fn set_exporting(on: bool) {
    EXPORTING.store(on, Ordering::Relaxed);
}

/// Whether spans are exported.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The first span of an invocation on this node (the edge's), under `incoming` (the
/// request's `traceparent`, already parsed) or in a new trace. Returns the span and
/// the context that names it, for the answer's `traceparent`.
pub fn edge_span(
    incoming: Option<TraceContext>,
    function: &str,
    method: &str,
) -> (Span, TraceContext) {
    let ctx = incoming.map_or_else(TraceContext::new_root, |c| c.child());
    let span = tracing::info_span!(
        target: TARGET,
        "http.invoke",
        trace_id = %ctx.trace_id,
        function,
        method,
    );
    let named = enter(&span, ctx, incoming);
    (span, named)
}

/// The first span of work that arrived from another node with `traceparent` (a
/// forwarded invocation, a call, a two-phase-commit message), named `name`. A missing
/// or malformed context starts a new trace.
pub fn remote_span(name: &'static str, traceparent: Option<&str>, function: &str) -> Span {
    let incoming = traceparent.and_then(TraceContext::parse);
    let ctx = incoming.map_or_else(TraceContext::new_root, |c| c.child());
    let span = match name {
        "serve.invoke" => {
            tracing::info_span!(target: TARGET, "serve.invoke", trace_id = %ctx.trace_id, function)
        }
        "serve.call" => {
            tracing::info_span!(target: TARGET, "serve.call", trace_id = %ctx.trace_id, function)
        }
        _ => {
            tracing::info_span!(target: TARGET, "serve.twophase", trace_id = %ctx.trace_id, function)
        }
    };
    enter(&span, ctx, incoming);
    span
}

/// Hold `ctx` in `span` (for [`current`] and [`outgoing`] below it) and, when spans are
/// exported, make `parent` the span's remote parent. Returns the context that names
/// `span` (the exported span's own id when exporting).
fn enter(span: &Span, ctx: TraceContext, parent: Option<TraceContext>) -> TraceContext {
    span.with_subscriber(|(id, dispatch)| {
        if let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>() {
            if let Some(data) = registry.span(id) {
                data.extensions_mut().insert(ctx);
            }
        }
    });
    if exporting() {
        if let Some(parent) = parent {
            otel::set_parent(span, parent);
        }
        if let Some(exported) = otel::context_of(span) {
            return exported;
        }
    }
    ctx
}

/// The trace context the current span is in, if it is part of an invocation's trace
/// (and spans of [`TARGET`] are enabled).
pub fn current() -> Option<TraceContext> {
    let span = Span::current();
    let mut found = None;
    span.with_subscriber(|(id, dispatch)| {
        let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>() else {
            return;
        };
        let Some(data) = registry.span(id) else {
            return;
        };
        found = data
            .scope()
            .find_map(|s| s.extensions().get::<TraceContext>().copied());
    });
    found
}

/// The context to send with work for another node, naming the current span as its
/// parent: `traceparent`, or `None` outside any invocation's trace.
pub fn outgoing() -> Option<String> {
    let ctx = current()?;
    if exporting() {
        if let Some(exported) = otel::context_of(&Span::current()) {
            return Some(exported.to_header());
        }
    }
    Some(ctx.child().to_header())
}

/// The bridge to `tracing-opentelemetry`, used only while spans are exported.
mod otel {
    use opentelemetry::trace::{SpanContext, TraceContextExt as _, TraceFlags, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    use super::{SpanId, TraceContext, TraceId};

    pub fn set_parent(span: &tracing::Span, parent: TraceContext) {
        let remote = SpanContext::new(
            opentelemetry::trace::TraceId::from_bytes(parent.trace_id.0),
            opentelemetry::trace::SpanId::from_bytes(parent.span_id.0),
            if parent.sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }

    pub fn context_of(span: &tracing::Span) -> Option<TraceContext> {
        let context = span.context();
        let s = context.span();
        let c = s.span_context();
        c.is_valid().then(|| TraceContext {
            trace_id: TraceId(c.trace_id().to_bytes()),
            span_id: SpanId(c.span_id().to_bytes()),
            sampled: c.is_sampled(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_round_trips() {
        let ctx = TraceContext::parse(GOOD).expect("parses");
        assert!(ctx.sampled);
        assert_eq!(ctx.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.to_header(), GOOD);
        let child = ctx.child();
        assert_eq!(child.trace_id, ctx.trace_id);
        assert_ne!(child.span_id, ctx.span_id);
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_may_add_fields() {
        let ctx =
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more")
                .expect("parses");
        assert!(!ctx.sampled);
    }

    #[test]
    fn new_traces_differ_and_are_sampled() {
        let (a, b) = (TraceContext::new_root(), TraceContext::new_root());
        assert_ne!(a.trace_id, b.trace_id);
        assert!(a.sampled);
        assert!(TraceContext::parse(&a.to_header()).is_some());
    }

    #[test]
    fn the_context_follows_the_spans_below_the_edge() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let incoming = TraceContext::parse(GOOD);
            let (span, named) = edge_span(incoming, "bank", "open");
            assert_eq!(named.trace_id, incoming.expect("good").trace_id);
            let _in = span.enter();
            let inner = tracing::info_span!(target: TARGET, "guest.run");
            let _inner = inner.enter();
            assert_eq!(current().map(|c| c.trace_id), Some(named.trace_id));
            let sent = outgoing().expect("inside a trace");
            let sent = TraceContext::parse(&sent).expect("a valid header");
            assert_eq!(sent.trace_id, named.trace_id);
            let remote = remote_span("serve.call", Some(&sent.to_header()), "bank");
            let _remote = remote.enter();
            assert_eq!(current().map(|c| c.trace_id), Some(named.trace_id));
        });
        assert_eq!(current(), None, "outside any span there is no trace");
    }
}
