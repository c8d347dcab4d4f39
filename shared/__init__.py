"""Code shared by every ProCrop service: settings, box math, image loading, storage, the vector index.

Nothing here imports torch, a queue, or a service: the gateway and the workers both stand on it.
"""
