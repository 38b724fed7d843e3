//! Exporting the invocations' traces: OpenTelemetry over OTLP (HTTP, protobuf) when an
//! endpoint is configured (`[traces] otlp_endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). Only the spans
//! of `understudy::trace::TARGET` are exported, in batches from a thread of the SDK's
//! own; with no endpoint nothing here runs (see `understudy::trace`).

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::Layer;

/// The standard variables that name an OTLP endpoint (the exporter reads them itself).
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// The exporter's provider; [`Exporter::shutdown`] sends what is still batched.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Send the spans still batched, and stop.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "the last traces could not be exported");
        }
    }
}

/// A layer exporting the invocations' spans, when `endpoint` (the config's base URL,
/// to which `/v1/traces` is added) or one of the standard variables names an endpoint;
/// `None` otherwise. `instance` names this node in the spans' resource
/// (`service.instance.id`).
///
/// Fails when the endpoint is not a URL the exporter accepts.
pub fn layer<S>(
    endpoint: Option<&str>,
    instance: &str,
) -> anyhow::Result<Option<(impl Layer<S>, Exporter)>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let from_env = ENDPOINT_VARS
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()));
    let endpoint = endpoint.map(str::trim).filter(|e| !e.is_empty());
    if endpoint.is_none() && !from_env {
        return Ok(None);
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary);
    if let Some(base) = endpoint {
        builder = builder.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
    }
    let exporter = builder.build().context(
        "the OTLP trace exporter (check [traces] otlp_endpoint or OTEL_EXPORTER_OTLP_ENDPOINT)",
    )?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("understudy")
        .with_attribute(KeyValue::new("service.instance.id", instance.to_owned()))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("understudy"))
        .with_filter(Targets::new().with_target(understudy::trace::TARGET, tracing::Level::INFO));
    understudy::trace::set_exporting(true);
    Ok(Some((layer, Exporter { provider })))
}
