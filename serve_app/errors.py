"""Client errors, each carrying the HTTP status it maps to.

Codecs and the server raise these; the transport turns any of them into
``{"error": "..."}`` with the status, so bad input is always a 4xx naming the problem.
"""


class InferenceError(Exception):
    status_code = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadInput(InferenceError):
    status_code = 400


class ModelNotFoundError(InferenceError):
    status_code = 404


class UnsupportedMediaType(InferenceError):
    status_code = 415


class PayloadTooLarge(InferenceError):
    status_code = 413
