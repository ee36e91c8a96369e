"""The Open Inference Protocol beside /v1: the same server, the same photos, the same answers, end to end.

    python -m bench.v2 [--weights DIR_OR_FILE] [--endpoint embed,reconstruct] [--concurrency 1,4,8]
                       [--protocols v1,v2-binary,v2-json,grpc] [--duration 10] [--warmup 3] [--pause-training]

One mae-serve process (bench/e2e.py's harness, gRPC on), and for each endpoint, protocol and concurrency a
closed-loop window (bench/loadgen.py; gRPC: a grpcio loop of the same shape) with pre-built requests:

    embed        v1: POST /v1/embed?pool=cls (multipart, JSON answer)  v2: outputs=[cls]  (FP32 [1, D])
    reconstruct  v1: POST /v1/reconstruct?mask_ratio=0.75 (PNG paste)  v2: outputs=[paste] (UINT8 [1, H, W, 3])

v2-binary asks for the binary tensor extension both ways (the image as BYTES, the output as raw bytes), v2-json for
a JSON output (the image still binary: an image does not fit JSON), grpc for ModelInfer with raw contents. Reports
images/s, latency p50/p95/p99, errors, batch sizes, answer bytes and server CPU per row; writes bench/results/v2.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from app.v2.tensors import HEADER_LENGTH, join_bytes
from bench import loadgen
from bench.common import TRAINING, VITB_DIR, machine, paused, photos, table, write_json
from bench.e2e import HOST, Server, batch_delta, parse_batch_sizes
from tests.harness import free_port, metric_value

V1_QUERIES = {"embed": "/v1/embed?pool=cls", "reconstruct": "/v1/reconstruct?mask_ratio=0.75"}
V2_OUTPUT = {"embed": "cls", "reconstruct": "paste"}
V2_PARAMETERS: dict[str, dict[str, Any]] = {"embed": {}, "reconstruct": {"mask_ratio": 0.75}}


def v2_body(endpoint: str, image: bytes, binary_out: bool) -> tuple[bytes, int]:
    raw = join_bytes([image])
    header = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": V2_OUTPUT[endpoint], "parameters": {"binary_data": binary_out}}],
        "parameters": V2_PARAMETERS[endpoint],
    }
    head = json.dumps(header).encode()
    return head + raw, len(head)


def v2_request(port: int, model: str, endpoint: str, image: bytes, binary_out: bool) -> bytes:
    body, n = v2_body(endpoint, image, binary_out)
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: mae-bench\r\n"
        f"Content-Type: application/octet-stream\r\n{HEADER_LENGTH}: {n}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def grpc_request(model: str, endpoint: str, image: bytes) -> bytes:
    """A serialized ModelInferRequest (tritonclient's messages), so the loop sends bytes and parses nothing."""
    from tritonclient.grpc import service_pb2 as pb

    msg = pb.ModelInferRequest(model_name=model, raw_input_contents=[join_bytes([image])])
    msg.inputs.add(name="image", datatype="BYTES", shape=[1])
    msg.outputs.add(name=V2_OUTPUT[endpoint])
    for key, value in V2_PARAMETERS[endpoint].items():
        msg.parameters[key].double_param = value
    return msg.SerializeToString()


async def grpc_closed_loop(address: str, payloads: list[bytes], concurrency: int, args: argparse.Namespace,
                           probe: Any) -> loadgen.LoadResult:  # fmt: skip
    """loadgen.closed_loop's shape over one HTTP/2 channel: N callers, each sends its next call on an answer."""
    import grpc

    res = loadgen.LoadResult()
    stop = asyncio.Event()
    done = [0] * concurrency
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out

        async def client(i: int) -> None:
            k = i
            while not stop.is_set():
                payload = payloads[k % len(payloads)]
                k += concurrency
                t = time.perf_counter()
                try:
                    answer = await call(payload, timeout=300)
                    status, n = 200, len(answer)
                except grpc.aio.AioRpcError:
                    status, n = 0, 0
                res.records.append(loadgen.Record(t, time.perf_counter(), status, n))
                done[i] += 1

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
        while time.perf_counter() - t0 < args.warmup or min(done) < 1:
            await asyncio.sleep(0.05)
        lat = sorted(r.end - r.start for r in res.records if r.status == 200)
        window = min(args.max_window, max(args.duration, args.min_rounds * (lat[len(lat) // 2] if lat else 0.0)))
        p0 = await probe()
        start, cpu0 = time.perf_counter(), time.process_time()
        res.warmup_s = start - t0
        await asyncio.sleep(window)
        end = time.perf_counter()
        res.window, res.client_cpu_s = (start, end), time.process_time() - cpu0
        res.probes = (p0, await probe())
        stop.set()
        await asyncio.wait(tasks, timeout=300)
    return res


def measure(server: Server, endpoint: str, protocol: str, payloads: list[bytes], conc: int,
            args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip

    async def probe() -> dict[str, Any]:
        _, body = await loadgen.fetch(HOST, server.port, "/metrics")
        text = body.decode()
        return {"t": time.perf_counter(), "cpu_s": server.cpu_seconds(), "batch": parse_batch_sizes(text),
                "images": metric_value(text, "mae_images_total", op=endpoint)}  # fmt: skip

    if protocol == "grpc":
        res = asyncio.run(grpc_closed_loop(server.grpc_address, payloads, conc, args, probe))
    else:
        loop = loadgen.closed_loop(HOST, server.port, payloads, conc, warmup_s=args.warmup, duration_s=args.duration,
                                   min_rounds=args.min_rounds, max_window_s=args.max_window,
                                   max_requests=args.max_requests, probe=probe)  # fmt: skip
        res = asyncio.run(loop)
    row: dict[str, Any] = {"endpoint": endpoint, "protocol": protocol, "concurrency": conc, **loadgen.summarize(res)}
    p0, p1 = res.probes
    row["server_cpu_pct"] = 100.0 * (p1["cpu_s"] - p0["cpu_s"]) / (p1["t"] - p0["t"])
    b = batch_delta(p0["batch"], p1["batch"], endpoint)
    row["batch_mean"], row["batches"] = b["mean"], b["batches"]
    print(f"  {endpoint:11s} {protocol:9s} c={conc:<3d} {row['images_per_s']:7.2f} img/s  "
          f"p50 {row['latency_ms_p50']:8.1f}  p99 {row['latency_ms_p99']:8.1f} ms  err {row['errors']}  "
          f"answer {row['mean_response_bytes'] / 1024:7.1f} KiB  cpu {row['server_cpu_pct']:.0f}%  "
          f"batch {row['batch_mean'] or 0:.1f}", flush=True)  # fmt: skip
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    pics = photos(args.images)
    env = dict(kv.split("=", 1) for kv in args.env)
    grpc_port = free_port()
    server = Server("mae", args.weights, {**env, "MAE_GRPC_PORT": str(grpc_port)})
    server.grpc_address = f"{HOST}:{grpc_port}"  # type: ignore[attr-defined]
    server.start()
    rows = []
    try:
        models = json.loads(asyncio.run(loadgen.fetch(HOST, server.port, "/v1/models"))[1])
        model = models["default"]
        print(f"[bench] mae-serve ready in {server.ready_s:.1f} s, model {model}", flush=True)
        for endpoint in args.endpoint.split(","):
            for protocol in args.protocols.split(","):
                if protocol == "v1":
                    payloads = [loadgen.multipart_request(HOST, server.port, V1_QUERIES[endpoint], name, data,
                                                          "image/png" if name.endswith(".png") else "image/jpeg")
                                for name, data in pics]  # fmt: skip
                elif protocol in ("v2-binary", "v2-json"):
                    binary = protocol == "v2-binary"
                    payloads = [v2_request(server.port, model, endpoint, data, binary) for _, data in pics]
                elif protocol == "grpc":
                    payloads = [grpc_request(model, endpoint, data) for _, data in pics]
                else:
                    raise SystemExit(f"unknown protocol {protocol!r}: v1, v2-binary, v2-json, grpc")
                for conc in (int(c) for c in args.concurrency.split(",")):
                    rows.append(measure(server, endpoint, protocol, payloads, conc, args))
    finally:
        server.stop()
    for r in rows:  # each v2 row against /v1 at the same endpoint and concurrency
        base = next((x for x in rows if x["protocol"] == "v1" and x["endpoint"] == r["endpoint"]
                     and x["concurrency"] == r["concurrency"]), None)  # fmt: skip
        r["vs_v1"] = r["images_per_s"] / base["images_per_s"] if base and base["images_per_s"] else None
    return {"benchmark": "v2", "machine": machine(), "weights": args.weights, "model": model,
            "images": [n for n, _ in pics], "settings": vars(args), "rows": rows}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="the Open Inference Protocol (REST binary / JSON, gRPC) beside /v1")
    ap.add_argument("--weights", default=str(VITB_DIR), help="ViT-B (default; bench.make_weights) or a small model")
    ap.add_argument("--endpoint", default="embed,reconstruct")
    ap.add_argument("--protocols", default="v1,v2-binary,v2-json,grpc")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per level (at least)")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--min-rounds", type=float, default=6.0, help="window >= this many warm-up median latencies")
    ap.add_argument("--max-window", type=float, default=40.0)
    ap.add_argument("--max-requests", type=int, default=5000)
    ap.add_argument("--images", type=int, default=6, help="how many val photos to cycle through")
    ap.add_argument("--env", action="append", default=[], help="MAE_NAME=value for mae-serve (repeatable)")
    ap.add_argument("--pause-training", action="store_true", help="SIGSTOP the background training while measuring")
    ap.add_argument("--out", default="v2", help="results file name under bench/results/")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    with paused(TRAINING if args.pause_training else None):
        result = run(args)
    cols = [("endpoint", "endpoint", ""), ("protocol", "protocol", ""), ("concurrency", "clients", "d"),
            ("images_per_s", "images/s", ".2f"), ("vs_v1", "/ v1", ".2f"), ("latency_ms_p50", "p50 ms", ".0f"),
            ("latency_ms_p99", "p99 ms", ".0f"), ("errors", "errors", "d"), ("batch_mean", "mean batch", ".1f"),
            ("mean_response_bytes", "answer bytes", ".0f"), ("server_cpu_pct", "server CPU %", ".0f")]  # fmt: skip
    print(table(result["rows"], cols, f"v2 beside v1 ({Path(args.weights).name})"))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
