"""The engine across processes (MAE_WORKERS > 1): one model process, N HTTP worker processes, over ZeroMQ.

Every worker decodes and encodes in its own interpreter (its own GIL); all of them send their images to the one
model process, whose LocalEngine batches them together (batching stays global) and runs the model. A ZeroMQ ROUTER
socket (ipc://) in the model process (`EngineServer`) talks to a DEALER socket in each worker (`RemoteEngine`, the
worker's stand-in for app.serving.engine.LocalEngine: the same `submit`).

    wire.py       the messages: their kinds and headers, results <-> array frames, error kinds
    server.py     EngineServer, the model process's side
    client.py     RemoteEngine, a worker's side: the catalog -> the worker's Registry, submit() -> the model process
    stand_in.py   RemoteConfig and RemoteModel: a model that runs in the model process, as a worker knows it

Not carried across: the engine's wait for images still being decoded (`coming`): the model process cannot see the
workers' decodes, so a partial batch never waits for them; under load batches still fill while the model runs.
"""

from app.serving.remote.client import RemoteEngine
from app.serving.remote.server import EngineServer
from app.serving.remote.stand_in import RemoteConfig, RemoteModel
from app.serving.remote.wire import pack, unpack

__all__ = ["EngineServer", "RemoteConfig", "RemoteEngine", "RemoteModel", "pack", "unpack"]
