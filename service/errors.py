"""The service's error tree. Third-party exceptions and the artifact contract's image errors are translated
into these once, at the boundary where they arise (the pixel path in the pipeline, ONNX Runtime in runtime,
the queue in batcher); only the app's exception handlers turn them into HTTP statuses, each with a JSON
``{"error": ...}`` a caller can act on. A model file that cannot be served is the contract's
``ArtifactError`` (start-up and repository only, never an HTTP answer).

    ServiceError
    ├── RequestError             the caller's fault                                      4xx
    │   ├── BadRequestError      undecodable image, bad parameter                         400
    │   ├── ForbiddenError       an operation this server's settings do not allow         403
    │   ├── NotFoundError        unknown model or version                                 404
    │   ├── NotAcceptableError   an answer in a form the request cannot have (PNG of many)  406
    │   ├── RequestTimeoutError  the body did not arrive within DEEPVIT_BODY_TIMEOUT_S      408
    │   ├── ConflictError        the model cannot do what was asked (no attention output)  409
    │   ├── PayloadTooLargeError body or pixel count over the limit                       413
    │   └── UnsupportedMediaTypeError                                                     415
    ├── UnavailableError         not ready, overloaded, queue full, draining (Retry-After) 503
    ├── DeadlineExceededError    the request's deadline passed while it was queued        504
    └── InferenceError           a batch failed in ONNX Runtime                           500
"""

from __future__ import annotations

from deepvit.artifact.errors import ArtifactError

__all__ = [
    "ArtifactError",
    "BadRequestError",
    "ConflictError",
    "DeadlineExceededError",
    "ForbiddenError",
    "InferenceError",
    "NotAcceptableError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RequestError",
    "RequestTimeoutError",
    "ServiceError",
    "UnavailableError",
    "UnsupportedMediaTypeError",
]


class ServiceError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestError(ServiceError):
    status = 400


class BadRequestError(RequestError):
    status = 400


class ForbiddenError(RequestError):
    status = 403


class NotFoundError(RequestError):
    status = 404


class NotAcceptableError(RequestError):
    status = 406


class RequestTimeoutError(RequestError):
    status = 408


class ConflictError(RequestError):
    status = 409


class PayloadTooLargeError(RequestError):
    status = 413


class UnsupportedMediaTypeError(RequestError):
    status = 415


class UnavailableError(ServiceError):
    status = 503

    def __init__(self, message: str, reason: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.reason = reason  # the label of deepvit_rejected_requests_total
        self.retry_after_s = retry_after_s


class DeadlineExceededError(ServiceError):
    status = 504
    reason = "deadline"  # the label of deepvit_rejected_requests_total


class InferenceError(ServiceError):
    status = 500
