"""The web service: HTTP in, model entry points out. Knows the model only through model/'s API."""
