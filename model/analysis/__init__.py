"""Looking inside a trained DeepViT: the paper's attention-collapse measurement (``deepvit analyze``)."""
