"""Quantization: group-wise k-bit codes of weights and KV cache (FlexGen's), their settings
(`config`, torch-free), GPTQ fits of the rounding (`gptq`, on `calibration` text), torch's int4
CPU kernel's tiles (`int4mm`) and GGUF's blocks kept as shipped (`blocks`). It depends on the
model description (`models.common`) only, never on the runtime that uses it."""

from flexeval.lazy import exports

__all__, __getattr__ = exports(
    __name__,
    {
        ".config": ("CompressionConfig",),
        ".compression": ("Quantized", "quantize", "dequantize"),
        ".gptq": ("FittedWeights",),
        ".calibration": ("Calibration",),
    },
)
