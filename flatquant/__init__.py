"""flatquant: FlatQuant W4A4KV4 quantization for Llama-family models, fake-quant and real INT4."""

__version__ = "0.1.0"
