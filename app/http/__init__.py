"""The HTTP server: uvicorn hardened, middleware, auth, the request's parameters and body, the /v1 routes, and the
one place that turns the serving core's errors into statuses (errors.py)."""
