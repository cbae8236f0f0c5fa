"""The model store, split on its seams:

- :mod:`.disk`: what the repository folder holds (``<name>/<version>/model.onnx``), each file's signature,
  the version policy, and the pure plans of what to load and unload;
- :mod:`.manager`: the versions in memory (session, batcher, state), leases, load and unload, and the one
  record of failed loads;
- :mod:`.sync`: keeping memory in step with disk, by polling and by the repository extension's requests.
"""
