"""Quantized inference: weights kept at 8 or 4 bits in memory (GGUF's own blocks, or ``--quantize int8|int4``)."""
