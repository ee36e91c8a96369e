"""Embed a dataset on a Ray cluster: the serving core's decode, preprocessing and model call, without HTTP.

`mae-embed-ray SRC --out DST` (app.raydata.cli): Ray Data reads the source's shards from wherever fsspec reaches
(client.dataset.storage), CPU tasks decode, an actor pool runs the model (app.raydata.stages), and the driver writes
one parquet file per source shard (client.dataset.table), resumable shard by shard (app.raydata.job). A front-end
of the serving core like app.v2, beside the HTTP one: it imports app.serving, app.settings, model and the dataset
vocabulary of client/, never app.http.
"""
