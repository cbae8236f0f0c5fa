"""The model side: DeepViT in PyTorch, checkpoint import, export to the artifact, and training."""
