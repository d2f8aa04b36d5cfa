"""Client errors, each carrying the HTTP status it maps to and a short machine-readable reason.

Codecs and the server raise these; the transport turns any of them into
``{"error": "...", "reason": "..."}`` with the status, so bad input is always a 4xx naming
the problem. The reason is also the label of the ``serve_app_input_errors`` metric, so it
must come from the small fixed vocabulary in :data:`REASONS` (bounded metric cardinality).
"""

REASONS = (
    "invalid_request",        # the body's structure is wrong (not an object, missing key, ...)
    "malformed_json",
    "malformed_binary",       # a binary body (.npy, V2 binary tensor extension) that cannot be read
    "malformed_csv",          # a text/csv body (MLflow's scoring protocol) that cannot be parsed
    "wrong_shape",            # feature count, ragged rows, shape/data mismatch, no rows
    "wrong_type",             # strings where numbers are needed, datatype mismatch, overflow
    "non_finite",             # Infinity
    "missing_value",          # null/NaN for a model that cannot take missing values
    "unknown_category",       # a value outside a column's training categories
    "rejected_by_model",      # the model (a user's pipeline) raised on the client's values
    "feature_names",          # unknown or missing named features
    "unknown_output",
    "model_not_found",
    "unsupported_media_type",
    "payload_too_large",
    "unauthorized",           # no or a wrong bearer token (serve_app.auth)
    "timeout",                # the model did not answer within the model's timeout_s (5xx)
    "reload_failed",          # an admin reload could not load the stored model (the old one serves on)
    "model_too_large",        # the model's artifact is over max_model_bytes: it is not loaded
    "overloaded",             # shed: the replica already works on its admission bound (5xx, Retry-After)
)


# Messages quote client input (names, shapes, datatypes): a bound keeps a hostile request
# from turning into a multi-megabyte error response and log line.
MAX_MESSAGE_CHARS = 2000


class InferenceError(Exception):
    status_code = 400
    reason = "invalid_request"
    retry_after_s: int | None = None  # when the client may try again (HTTP Retry-After, gRPC pushback)

    def __init__(self, message: str, reason: str | None = None):
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message) - MAX_MESSAGE_CHARS} more characters)"
        super().__init__(message)
        self.message = message
        if reason is not None:
            if reason not in REASONS:
                raise ValueError(f"unknown error reason {reason!r}")
            self.reason = reason


class BadInput(InferenceError):
    """The request's content is wrong; its ``reason`` says how (shape, type, names, ...)."""

    status_code = 400


class ModelNotFoundError(InferenceError):
    """No such model or version here (the store layer's own is ``store.NotInStore``)."""

    status_code, reason = 404, "model_not_found"


class UnsupportedMediaType(InferenceError):
    status_code, reason = 415, "unsupported_media_type"


class PayloadTooLarge(InferenceError):
    """Above ``max_request_bytes``: refused before the body is read whole, declared or chunked."""

    status_code, reason = 413, "payload_too_large"


class Unauthorized(InferenceError):
    status_code, reason = 401, "unauthorized"


class ReloadFailed(InferenceError):
    """The store's model could not be loaded; the loaded version keeps serving: a conflict
    between the request and the store's state, not a server fault."""

    status_code, reason = 409, "reload_failed"


class ModelTooLarge(InferenceError):
    """The model's stored artifact is over ``max_model_bytes``, so it is never loaded. 409 (gRPC
    FAILED_PRECONDITION): the request is fine and so is the model, but this server's bound refuses
    it until an operator raises the bound; not 413, which would tell the client its request is
    too large (a client that splits its batch on 413 would try again in vain)."""

    status_code, reason = 409, "model_too_large"


class InferenceTimeout(InferenceError):
    """Not the client's fault: 504, so clients and load balancers may retry elsewhere."""

    status_code, reason = 504, "timeout"


class Overloaded(InferenceError):
    """Shed before any work: the replica already works on as many requests as it admits
    (``AppConfig.admission``). 503 with ``Retry-After``: the client, or a load balancer, should
    try again later or elsewhere; a quick refusal instead of a queue that outgrows the timeout."""

    status_code, reason = 503, "overloaded"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s
