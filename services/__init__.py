"""ProCrop services: each folder is one kind of worker (or the gateway), a thin shell over a core."""
