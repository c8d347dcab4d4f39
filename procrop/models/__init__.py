"""Model bundles shipped inside the procrop package (found with `importlib.resources`)."""
