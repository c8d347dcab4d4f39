"""The tiny crop model the weak-supervision tests train (a TOML [model] section): small enough
for a few CPU seconds an epoch, the same classes as the shipped model."""

TINY_MODEL_TOML = """
[model]
profile = "lite"
input_size = 64
hidden_dim = 32
num_heads = 2
enc_layers = 1
dec_layers = 1
ffn_dim = 64
num_queries = 12
k = 2
dropout = 0.0
"""
