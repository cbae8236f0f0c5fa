"""The Open Inference Protocol (KServe v2) over REST: message schemas, the tensor codec (JSON and the binary
tensor data extension), and the mapping of an inference request onto a served DeepViT version. The
endpoints themselves are in ``deepvit.service.routes.oip``."""
