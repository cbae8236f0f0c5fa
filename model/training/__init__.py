"""The training side of the model: recipe, data, loop, start and resume, distributed runs, recalibration,
evaluation and history. Needs the ``train`` extra (torch, timm)."""
