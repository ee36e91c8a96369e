"""The Open Inference Protocol (KServe v2; Triton's HTTP/REST and GRPC protocol): a front-end over the serving core.

contract.py  the tensor contract: the input, the outputs with their shapes and datatypes, the request parameters,
             which pass (encoder alone, or encoder and decoder) the requested outputs need; what REST and gRPC
             share (the server's metadata, `find`: the model a request names)
schemas.py   the JSON bodies of the REST protocol, as pydantic models (parsing and /docs)
tensors.py   the wire format: the binary tensor extension, BYTES elements, raw output contents
infer.py     one inference request through app.serving.pipeline into the same engine queues as /v1
rest.py      /v2 on the HTTP port (FastAPI router)
errors.py    the v2 error shape on /v2 paths (V2ErrorShape, the middleware app.http.main installs)
grpc.py      inference.GRPCInferenceService on MAE_GRPC_PORT (grpcio, the messages tritonclient ships)
"""
