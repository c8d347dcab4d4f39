"""CAD dataset generation (the paper's "composition-aware dataset"): a professional photo placed
on a larger canvas, the rest out-painted, the placed region kept as the first crop label."""
