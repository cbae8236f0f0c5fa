"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), served by grpcio's asyncio
server in the HTTP server's process and event loop, through the same pipeline: ``codec`` maps the messages
onto it, ``servicer`` answers the RPCs, ``health`` is ``grpc.health.v1`` following readiness, ``server``
starts, drains and stops it. The message classes are generated from the vendored protos in ``proto/``."""
