"""Quantized inference: weights kept at 8 or 4 bits in memory (GGUF's own blocks, or ``--quantize int8|int4``)."""

# The GGUF block types kept at their own precision (``--quantize gguf``; olmo_tap.quant.gguf maps each exactly). Here,
# where importing it costs nothing, so that the CLI's help names them without importing torch.
KEPT_GGUF_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q8_0", "Q6_K")
