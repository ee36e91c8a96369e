"""inference.GRPCInferenceService on MAE_GRPC_PORT: the Open Inference Protocol over gRPC, on the HTTP server's event
loop, so ModelInfer goes through app.serving.pipeline into the same engine queues as /v1 and /v2 REST.

The messages are the ones tritonclient ships (`tritonclient.grpc.service_pb2`, generated from Triton's
grpc_service.proto, whose core is the protocol's GRPCInferenceService): every v2 client speaks exactly these bytes,
the stubs are kept by the protocol's main implementers, and nothing generated lives in this repository. A process can
hold one definition of the protobuf package `inference`, so this one coexists with tritonclient (the same modules).

Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (raw input and output
contents, or typed bytes_contents for the input); anything else is UNIMPLEMENTED. The same bearer keys as HTTP, in
the `authorization` metadata (ServerLive and ServerReady are open, like the HTTP probes); MAE_LIMIT_CONCURRENCY RPCs
at once (then RESOURCE_EXHAUSTED, from grpcio); requests up to MAE_GRPC_MAX_MESSAGE_BYTES. On SIGTERM it stops
taking RPCs and lets those in flight finish within the drain budget, together with HTTP (app.http.readiness.Readiness).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from app.http.auth import check_bearer
from app.http.errors import APIError
from app.http.readiness import Readiness
from app.serving import metrics
from app.serving.registry import ModelEntry
from app.serving.service import Service
from app.settings import Settings
from app.v2 import contract, infer, tensors
from app.v2.contract import Requested, Scalar, bad

log = logging.getLogger("mae.v2.grpc")
SERVICE = "inference.GRPCInferenceService"

# HTTP status of an APIError -> the gRPC status code (https://grpc.github.io/grpc/core/md_doc_statuscodes.html)
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class Servicer:
    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness

    # ------------------------------------------------------------------ what every call checks
    def _service(self, context: Context, *, keyed: bool = True) -> Service:
        r = self.readiness
        if keyed:
            given = ""
            for key, value in context.invocation_metadata() or ():
                if key == "authorization":
                    given = value if isinstance(value, str) else value.decode("latin-1")
            check_bearer(r.settings.api_key_list, given)
        return r.service_or_503()

    # ------------------------------------------------------------------ health and metadata
    async def ServerLive(self, request: Any, context: Context) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=self.readiness.ready)

    async def ModelReady(self, request: Any, context: Context) -> Any:
        contract.find(self._service(context), request.name, request.version)  # NOT_FOUND for a model not loaded
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: Context) -> Any:
        self._service(context)
        return pb.ServerMetadataResponse(
            name=contract.SERVER, version=contract.SERVER_VERSION, extensions=contract.EXTENSIONS
        )

    async def ModelMetadata(self, request: Any, context: Context) -> Any:
        entry = contract.find(self._service(context), request.name, request.version)
        return pb.ModelMetadataResponse(
            name=entry.name,
            versions=[contract.VERSION],
            platform=contract.PLATFORM,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t.as_dict()) for t in contract.inputs(entry)],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t.as_dict()) for t in contract.outputs(entry)],
        )

    # ------------------------------------------------------------------ inference
    async def ModelInfer(self, request: Any, context: Context) -> Any:
        service = self._service(context)
        entry = contract.find(service, request.model_name, request.model_version)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        loop = asyncio.get_running_loop()
        req = await loop.run_in_executor(service.io_pool, read, request, service.settings.max_images_per_request)
        answer = await infer.infer(service, entry, req, deadline)
        return await loop.run_in_executor(service.io_pool, write, answer, entry)


def _scalar(name: str, p: Any) -> Scalar:
    which = p.WhichOneof("parameter_choice")
    if which is None:
        raise bad(f"parameter {name!r} has no value")
    value: Scalar = getattr(p, which)
    return value


def read(msg: Any, max_images: int) -> tensors.Request:
    """A ModelInferRequest -> the request (the I/O pool)."""
    if len(msg.inputs) != 1:
        raise bad(f"{len(msg.inputs)} inputs: the model takes one, {contract.INPUT!r} (BYTES [-1])")
    t = msg.inputs[0]
    n = contract.check_input(t.name, t.datatype, list(t.shape), max_images)
    for key in t.parameters:
        raise bad(f"input {t.name!r}: unsupported parameter {key!r}")
    raw = list(msg.raw_input_contents)
    typed = t.HasField("contents") and t.contents.ByteSize() > 0
    if raw:
        if len(raw) != 1:
            raise bad(f"raw_input_contents has {len(raw)} entries for 1 input")
        if typed:
            raise bad(f"input {t.name!r} has both raw_input_contents and contents")
        images = tensors.split_bytes(raw[0], n, f"input {t.name!r}")
    else:
        others = [f.name for f, _ in t.contents.ListFields() if f.name != "bytes_contents"]
        if others:
            raise bad(f"input {t.name!r} is BYTES: its contents go in bytes_contents, not {others[0]}")
        images = list(t.contents.bytes_contents)
        if len(images) != n:
            raise bad(f"input {t.name!r}: shape [{n}] but {len(images)} bytes_contents elements")
    parameters = {k: _scalar(k, v) for k, v in msg.parameters.items()}
    outputs = [Requested(o.name, {k: _scalar(k, v) for k, v in o.parameters.items()}) for o in msg.outputs]
    return tensors.Request(msg.id or None, msg.model_name, msg.model_version, parameters, images, outputs or None)


def write(r: tensors.Response, entry: ModelEntry) -> Any:
    """The response -> a ModelInferResponse, every output as raw_output_contents (the I/O pool)."""
    msg = pb.ModelInferResponse(model_name=r.model_name, model_version=contract.VERSION, id=r.id or "")
    for key, value in r.parameters.items():
        p = msg.parameters[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = value
    for o in r.outputs:
        msg.outputs.add(name=o.name, datatype=o.datatype, shape=o.shape)
        msg.raw_output_contents.append(o.raw())
    return msg


# ---------------------------------------------------------------------------------------------- the server
def _rpc(name: str, fn: Callable[[Any, Context], Awaitable[Any]], request: Any, response: Any) -> Any:
    """One method: its errors as gRPC statuses with our messages, counted in mae_requests_total like HTTP's.

    The request is parsed here, not by grpcio, so that bytes that are no such message are INVALID_ARGUMENT (grpcio
    answers a failing deserializer with INTERNAL)."""
    route = f"/{SERVICE}/{name}"

    async def handler(raw: bytes, context: Context) -> Any:
        t0, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            try:
                msg = request.FromString(raw)
            except DecodeError as e:
                raise bad(f"not a {request.DESCRIPTOR.name}: {e}") from None
            return await fn(msg, context)
        except APIError as e:
            e = contract.as_v2(e)
            code = CODES.get(e.status, grpc.StatusCode.INTERNAL)
            trailing = (("retry-after", e.headers["Retry-After"]),) if "Retry-After" in e.headers else ()
            await context.abort(code, e.message, trailing)
        except asyncio.CancelledError:  # the client went away or the drain budget ran out: its images were dropped
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("unexpected error in %s", name)
            await context.abort(code, "internal error; see the server log")
        finally:
            metrics.REQUESTS.labels(route, code.name).inc()
            metrics.LATENCY.labels(route).observe(time.perf_counter() - t0)

    return grpc.unary_unary_rpc_method_handler(handler, response_serializer=response.SerializeToString)


def handlers(servicer: Servicer) -> grpc.GenericRpcHandler:
    s = servicer
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ServerLive": _rpc("ServerLive", s.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": _rpc("ServerReady", s.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": _rpc("ModelReady", s.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": _rpc(
                "ServerMetadata", s.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
            ),
            "ModelMetadata": _rpc("ModelMetadata", s.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": _rpc("ModelInfer", s.ModelInfer, pb.ModelInferRequest, pb.ModelInferResponse),
        },
    )


async def start(settings: Settings, readiness: Readiness) -> grpc.aio.Server:
    """Listen on MAE_HOST:MAE_GRPC_PORT; registers the graceful stop with the shutdown signal."""
    assert settings.grpc_port is not None
    max_message = settings.grpc_max_message_bytes or settings.max_body_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", -1),  # answers are bounded by the images per request and the model
            ("grpc.so_reuseport", 0),  # a port already taken is an error, not a second server sharing it
        ],
        maximum_concurrent_rpcs=settings.limit_concurrency,
    )
    server.add_generic_rpc_handlers((handlers(Servicer(readiness)),))
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"gRPC cannot listen on {address}: {e}") from None
    await server.start()
    log.info("gRPC (v2 GRPCInferenceService) on %s:%d, requests up to %d bytes", settings.host, port, max_message)

    stopping: list[asyncio.Future[None]] = []  # held: the event loop keeps only weak references to tasks

    def drain(budget_s: float) -> None:  # on the event loop, at the shutdown signal (app.http.server)
        stopping.append(asyncio.ensure_future(server.stop(budget_s)))

    readiness.on_drain.append(drain)
    return server
