"""OTLP/HTTP span export with a faster protobuf encoder than the SDK's.

The OpenTelemetry SDK's exporter (``opentelemetry-exporter-otlp-proto-http`` 1.45) builds a
protobuf object per span, attribute and value before serialising the batch. On the 2-CPU
benchmark machine that took about 18 µs of Python time per span, in the exporting thread of
every agent process. `encode_spans` writes the same ``ExportTraceServiceRequest`` bytes
directly, in about 7 µs per span, and `OTLPHTTPSpanExporter` sends them through the SDK
exporter's own HTTP client, so endpoint, headers, timeout, compression, certificates and
retries still come from the standard ``OTEL_EXPORTER_OTLP_*`` variables.

Wire format: ``opentelemetry/proto/trace/v1/trace.proto`` and ``common/v1/common.proto``
(OTLP 1.x). Fields are written in field-number order, as protobuf serialisers do.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode

logger = logging.getLogger(__name__)

# OTLP's SpanKind numbers differ from the Python API's enum values.
_KIND_FIELDS = {
    SpanKind.INTERNAL: b"\x30\x01",
    SpanKind.SERVER: b"\x30\x02",
    SpanKind.CLIENT: b"\x30\x03",
    SpanKind.PRODUCER: b"\x30\x04",
    SpanKind.CONSUMER: b"\x30\x05",
}
# Span.flags and Link.flags: bit 8 is set when the parent's locality is known, and bit 9
# when the parent is remote.
_FLAGS_REMOTE_KNOWN = 0x100
_FLAGS_REMOTE = 0x200

# Encoded KeyValue fields of string attributes, which repeat from span to span (agent
# types, handlers, agent names). The cache is cleared when it reaches this many entries,
# so unbounded attribute values cannot grow it.
MAX_CACHED_ATTRIBUTES = 4096
_attribute_cache: dict[tuple[int, str, str], bytes] = {}
# Encoded name fields of spans, and encoded string attribute sets of spans, bounded in the
# same way.
_name_cache: dict[str, bytes] = {}
_attribute_set_cache: dict[tuple[tuple[str, str], ...], bytes] = {}

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_SMALL_VARINTS = [bytes((value,)) for value in range(128)]
_fixed32 = struct.Struct("<I").pack
_fixed64 = struct.Struct("<Q").pack
_double = struct.Struct("<d").pack
# Span.status of a span whose status was never set, and Span.flags of a span with a local
# or no parent and of one with a remote parent.
_UNSET_STATUS_FIELD = b"\x7a\x00"
_LOCAL_PARENT_FLAGS_FIELD = b"\x85\x01" + _fixed32(_FLAGS_REMOTE_KNOWN)
_REMOTE_PARENT_FLAGS_FIELD = b"\x85\x01" + _fixed32(_FLAGS_REMOTE_KNOWN | _FLAGS_REMOTE)


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """Encode finished spans as a serialised OTLP ``ExportTraceServiceRequest``.

    Spans are grouped by resource and instrumentation scope, as the SDK's encoder groups
    them. An attribute whose value has a type OTLP cannot carry is left out and logged.
    """
    by_identity: dict[tuple[int, int], tuple[Resource, InstrumentationScope | None, list[bytes]]]
    by_identity = {}
    for span in spans:
        key = (id(span.resource), id(span.instrumentation_scope))
        group = by_identity.get(key)
        if group is None:
            group = by_identity[key] = (span.resource, span.instrumentation_scope or None, [])
        group[2].append(_message(2, _span(span)))

    # Equal resources and scopes that are distinct objects still share one message.
    by_resource: list[tuple[Resource, list[tuple[InstrumentationScope | None, list[bytes]]]]]
    by_resource = []
    for resource, scope, encoded in by_identity.values():
        scopes = _find_or_add(by_resource, resource)
        _find_or_add(scopes, scope).extend(encoded)

    request = []
    for resource, scopes in by_resource:
        body = [_message(1, _resource(resource))]
        body.extend(_message(2, _scope_spans(scope, encoded)) for scope, encoded in scopes)
        if resource.schema_url:
            body.append(_string(3, resource.schema_url))
        request.append(_message(1, b"".join(body)))
    return b"".join(request)


def _find_or_add(entries: list[tuple[Any, list[Any]]], key: Any) -> list[Any]:
    """Return the list paired with a key equal to ``key`` in ``entries``, adding one if none."""
    for known, values in entries:
        if known is key or known == key:
            return values
    values: list[Any] = []
    entries.append((key, values))
    return values


class OTLPHTTPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter, with `encode_spans` as its encoder.

    It sends through the SDK exporter's HTTP client (``_client``, present in SDK 1.45).
    When that client is missing, or when ``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED=true``
    turns on the SDK's own exporter metrics, it falls back to the SDK's ``export``.

    NOTE: ``_client`` is private to the SDK. An SDK release that renames it keeps export
    working through the fallback but loses the faster encoder, and
    ``test_exporter_fast_path_available_with_installed_sdk`` then fails.
    """

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if (
            not self.is_fast_path_available()
            or getattr(self, "_shutdown", False)
            or os.environ.get("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "").strip().lower()
            == "true"
        ):
            return super().export(spans)

        try:
            data = encode_spans(spans)
        except Exception as error:
            logger.error("OTLP export of %d spans failed: encoding raised %r", len(spans), error)
            return SpanExportResult.FAILURE

        limit = getattr(self, "_max_request_size", 0) or 0
        if 0 < limit < len(data):
            logger.warning(
                "OTLP export of %d spans dropped: %d bytes is over the %d-byte request limit",
                len(spans),
                len(data),
                limit,
            )
            return SpanExportResult.FAILURE

        # The client retries, and logs a failure itself.
        result = self._client.export(data)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE

    def is_fast_path_available(self) -> bool:
        """Return whether `export` uses `encode_spans` with this SDK version."""
        return callable(getattr(getattr(self, "_client", None), "export", None))


# --- messages --------------------------------------------------------------------------------


def _span(span: ReadableSpan) -> bytes:
    context = span.context
    parent = span.parent
    parts = [
        b"\x0a\x10"
        + context.trace_id.to_bytes(16, "big")
        + b"\x12\x08"
        + context.span_id.to_bytes(8, "big")
    ]
    if context.trace_state:
        parts.append(_string(3, _trace_state(context)))
    if parent is not None:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    name = span.name
    if name:
        name_field = _name_cache.get(name)
        if name_field is None:
            if len(_name_cache) >= MAX_CACHED_ATTRIBUTES:
                _name_cache.clear()
            name_field = _name_cache[name] = _string(5, name)
        parts.append(name_field)
    parts.append(_KIND_FIELDS[span.kind])
    if span.start_time:
        parts.append(b"\x39" + _fixed64(span.start_time))
    if span.end_time:
        parts.append(b"\x41" + _fixed64(span.end_time))
    attributes = span.attributes
    if attributes:
        parts.append(_span_attributes(attributes))
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))
    for event in span.events:
        parts.append(_message(11, _event(event)))
    if span.dropped_events:
        parts.append(b"\x60" + _varint(span.dropped_events))
    for link in span.links:
        parts.append(_message(13, _link(link)))
    if span.dropped_links:
        parts.append(b"\x70" + _varint(span.dropped_links))

    status = span.status
    if status is not None:
        if status.status_code is StatusCode.UNSET and not status.description:
            parts.append(_UNSET_STATUS_FIELD)
        else:
            status_parts = []
            if status.description:
                status_parts.append(_string(2, status.description))
            if status.status_code.value:
                status_parts.append(b"\x18" + _varint(status.status_code.value))
            parts.append(_message(15, b"".join(status_parts)))

    if parent is not None and parent.is_remote:
        parts.append(_REMOTE_PARENT_FLAGS_FIELD)
    else:
        parts.append(_LOCAL_PARENT_FLAGS_FIELD)
    return b"".join(parts)


def _event(event: Event) -> bytes:
    parts = []
    if event.timestamp:
        parts.append(b"\x09" + _fixed64(event.timestamp))
    if event.name:
        parts.append(_string(2, event.name))
    if event.attributes:
        parts.extend(_attributes(3, event.attributes))
    if event.dropped_attributes:
        parts.append(b"\x20" + _varint(event.dropped_attributes))
    return b"".join(parts)


def _link(link: Link) -> bytes:
    context = link.context
    parts = [
        b"\x0a\x10",
        context.trace_id.to_bytes(16, "big"),
        b"\x12\x08",
        context.span_id.to_bytes(8, "big"),
    ]
    if link.attributes:
        parts.extend(_attributes(4, link.attributes))
    if link.dropped_attributes:
        parts.append(b"\x28" + _varint(link.dropped_attributes))
    flags = _FLAGS_REMOTE_KNOWN
    if context.is_remote:
        flags |= _FLAGS_REMOTE
    parts.append(b"\x35" + _fixed32(flags))
    return b"".join(parts)


def _scope_spans(scope: InstrumentationScope | None, spans: list[bytes]) -> bytes:
    scope_parts = []
    if scope is not None:
        if scope.name:
            scope_parts.append(_string(1, scope.name))
        if scope.version:
            scope_parts.append(_string(2, scope.version))
        if scope.attributes:
            scope_parts.extend(_attributes(3, scope.attributes))
    parts = [_message(1, b"".join(scope_parts)), *spans]
    if scope is not None and scope.schema_url:
        parts.append(_string(3, scope.schema_url))
    return b"".join(parts)


def _resource(resource: Resource) -> bytes:
    return b"".join(_attributes(1, resource.attributes))


def _trace_state(context: SpanContext) -> str:
    trace_state = context.trace_state
    if not trace_state:
        return ""
    return ",".join(f"{key}={value}" for key, value in trace_state.items())


# --- attributes ------------------------------------------------------------------------------


def _span_attributes(attributes: Mapping[str, Any]) -> bytes:
    """Encode a span's attributes, looking the whole set up at once when all are strings.

    Arbor's spans repeat a few sets of attributes (agent type, kind, agent, handler), so
    one lookup of the set replaces one per attribute.
    """
    items = tuple(attributes.items())
    for _key, value in items:
        if type(value) is not str:
            return b"".join(_attributes(9, attributes))
    encoded = _attribute_set_cache.get(items)
    if encoded is None:
        if len(_attribute_set_cache) >= MAX_CACHED_ATTRIBUTES:
            _attribute_set_cache.clear()
        encoded = _attribute_set_cache[items] = b"".join(_attributes(9, attributes))
    return encoded


def _attributes(field: int, attributes: Mapping[str, Any]) -> list[bytes]:
    encoded = []
    for key, value in attributes.items():
        try:
            if type(value) is str:
                cache_key = (field, key, value)
                key_value = _attribute_cache.get(cache_key)
                if key_value is None:
                    if len(_attribute_cache) >= MAX_CACHED_ATTRIBUTES:
                        _attribute_cache.clear()
                    key_value = _message(field, _key_value(key, value))
                    _attribute_cache[cache_key] = key_value
            else:
                key_value = _message(field, _key_value(key, value))
        except (TypeError, ValueError) as error:
            logger.error("span attribute %r not exported: %s", key, error)
            continue
        encoded.append(key_value)
    return encoded


def _key_value(key: str, value: Any) -> bytes:
    return _string(1, key) + _message(2, _any_value(value))


def _any_value(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _string(1, value)
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"integer {value} is outside the int64 range")
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _double(value)
    if isinstance(value, bytes):
        return _length_delimited(7, value)
    if isinstance(value, Sequence):
        return _message(5, b"".join(_message(1, _any_value(item)) for item in value))
    if isinstance(value, Mapping):
        items = (_message(1, _key_value(str(key), item)) for key, item in value.items())
        return _message(6, b"".join(items))
    raise TypeError(f"value of type {type(value).__name__} has no OTLP encoding")


# --- wire format -----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


# An embedded message is written as a length-delimited field.
_message = _length_delimited


def _string(field: int, text: str) -> bytes:
    return _length_delimited(field, text.encode("utf-8"))
