"""OpenAI-compatible POST /v1/embeddings for images: a front-end over app.serving.pipeline, beside app/v2."""
