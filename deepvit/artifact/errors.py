"""What can be wrong with an artifact or an image. Each side translates these into its own errors once
(the service into HTTP statuses, the command line into an exit code); the message says what to do."""

from __future__ import annotations


class ContractError(ValueError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ArtifactError(ContractError):
    """A model file that cannot be served: not ONNX, not made by ``deepvit export``, inconsistent metadata."""


class ImageError(ContractError):
    """Bytes that are not an image this contract decodes (unknown format, truncated, corrupt, no pixels)."""


class ImageTooLargeError(ImageError):
    """An image (or a request's images together) over a pixel or aspect-ratio limit, found from the header."""


class DecodeBusyError(ContractError):
    """Not the image's fault: the decoding memory it needs stayed taken by others for as long as it could wait."""
