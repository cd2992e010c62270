"""gRPC helpers: strict request decoding so bad bytes get INVALID_ARGUMENT, not INTERNAL.

grpc's default deserializer turns unparsable bytes into INTERNAL, and protobuf silently keeps
a known field sent with the wrong wire type as an unknown field (the field reads as its
default). ``strict_service`` registers handlers that decode the request themselves and answer
both cases with INVALID_ARGUMENT naming the problem.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from freshet import telemetry
from freshet.tensors import TensorError, from_tensor

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]


class BadRequest(ValueError):
    """A request is well-formed protobuf but violates the contract; answered with ``code``."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


def tensor_arg(
    tensor, dtype, ndim: int, name: str, max_len: int | None = None, unit: str | None = None
) -> np.ndarray:
    """Decodes a request's tensor field; a wrong dtype/shape is INVALID_ARGUMENT, too many rows RESOURCE_EXHAUSTED.

    Raises:
        BadRequest: naming the field and the problem.
    """
    try:
        array = from_tensor(tensor, dtype, ndim, name)
    except TensorError as exc:
        raise BadRequest(str(exc)) from None
    if max_len is not None and len(array) > max_len:
        raise BadRequest(
            f"{len(array)} {unit or name} exceed the limit of {max_len}", grpc.StatusCode.RESOURCE_EXHAUSTED
        )
    return array


def decode_strict(request_type: type[Message], raw: bytes) -> Message:
    """Parses ``raw`` as ``request_type``; a known field number with the wrong wire type is an error.

    Raises:
        BadRequest: the bytes do not parse, or carry a wrongly typed known field.
    """
    try:
        msg = request_type.FromString(raw)
    except DecodeError as exc:
        raise BadRequest(f"cannot decode {request_type.DESCRIPTOR.full_name}: {exc}") from None
    _check_unknown(msg)
    return msg


def _check_unknown(msg: Message) -> None:
    known = msg.DESCRIPTOR.fields_by_number
    for field in UnknownFieldSet(msg):
        if field.field_number in known:
            name = known[field.field_number].name
            raise BadRequest(f"{msg.DESCRIPTOR.full_name}.{name} has the wrong type (wire type {field.wire_type})")
    for desc, value in msg.ListFields():
        if desc.message_type is None:
            continue
        if desc.is_repeated:
            if desc.message_type.GetOptions().map_entry:
                continue
            for item in value:
                _check_unknown(item)
        else:
            _check_unknown(value)


def strict_service(service_name: str, methods: dict[str, tuple[Handler, type[Message]]]) -> grpc.GenericRpcHandler:
    """A generic handler for unary methods ``{name: (handler, request_type)}`` of ``service_name``.

    Each handler runs inside a span named after the method, under the caller's trace context;
    ``BadRequest`` raised by a handler becomes a status with its code and message.
    """

    def wrap(method: str, handler: Handler, request_type: type[Message]):
        tracer = telemetry.tracer(service_name)

        async def call(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
            parent = telemetry.extract_grpc(context.invocation_metadata())
            with tracer.start_as_current_span(method, context=parent):
                try:
                    request = decode_strict(request_type, raw)
                    return await handler(request, context)
                except BadRequest as exc:
                    await context.abort(exc.code, str(exc))

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=None, response_serializer=lambda m: m.SerializeToString()
        )

    return grpc.method_handlers_generic_handler(
        service_name, {name: wrap(name, h, t) for name, (h, t) in methods.items()}
    )
