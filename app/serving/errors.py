"""What the serving core answers instead of a result: one exception class per reason, each with a `code`.

They know nothing of HTTP: `app.http.errors.api_error` gives each class its status, in one place (the v2 and
OpenAI front-ends reshape that answer, never re-decide it).
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of every refusal the serving core gives; `code` is the machine-readable reason."""

    code = "serving_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


# ------------------------------------------------------------------------------------------------ the request
class ImageError(ServingError, ValueError):
    """A client's image we will not process; `code` names why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code)


class ImageTooLarge(ImageError):
    """Over a limit (pixels, scans): refused before decoding."""


class UnsupportedImage(ImageError):
    """Not a format (or a kind of image) the service takes."""


class UnreadableImage(ImageError):
    """Empty, truncated or corrupt."""


class BadMask(ServingError):
    """The patches a request names cannot be a mask of this model (out of range, repeated, all of them)."""

    code = "bad_mask"


class UnknownModel(ServingError):
    """The request names a model that is not loaded."""

    code = "unknown_model"


class NotCapable(ServingError):
    """The model cannot do what was asked: reconstruct without a pixel decoder, pool=cls without a CLS token."""


# ------------------------------------------------------------------------------------------------ the engine
class EngineError(ServingError):
    """Base for answers the engine gives instead of a result."""

    code = "compute_failed"


class Overloaded(EngineError):
    code = "overloaded"


class DeadlineExceeded(EngineError):
    code = "deadline_exceeded"


class ComputeFailed(EngineError):
    code = "compute_failed"
