"""Embed a whole dataset through a mae-serve server: `mae-client embed-dataset SRC --out DIR`.

sources (folder, list of paths, tar) -> run (in order, batches kept full) -> send (HTTP, retries) -> store
(.npy shards, index.csv, manifest.json; resumable). `load_embeddings(DIR)` reads the result back.
"""

from client.dataset.runner import Options, Summary, embed_dataset, run
from client.dataset.store import ShardedArray, load_embeddings, load_index

__all__ = ["Options", "ShardedArray", "Summary", "embed_dataset", "load_embeddings", "load_index", "run"]
