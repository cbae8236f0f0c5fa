"""Batch prediction: ``deepvit predict`` classifies a folder, a listing or a bucket on Ray Data.

The same artifact, pixel path and top-k as ``POST /classify`` (through :mod:`deepvit.artifact`, never the HTTP
stack), one Parquet row per input file, resumable after a crash, local or on a Ray cluster:

- :mod:`.inputs`: what SRC names (a folder, a listing, an ``s3://`` or ``gs://`` prefix) as a list of files;
- :mod:`.rows`: the output's row schema, one row per file: its top-k or its error;
- :mod:`.classifier`: the callable class Ray Data's actor pool runs: bytes → pixel path → session → rows;
- :mod:`.output`: the output folder: what a previous run finished, what it left half written, the tally;
- :mod:`.job`: the Ray Data pipeline, from ``ray.init`` to the summary;
- :mod:`.cli`: the ``predict`` subcommand.

Ray and pyarrow come with the optional extra ``batch`` (``pip install 'deepvit-serve[batch]'``); they are
imported when the command runs.
"""
