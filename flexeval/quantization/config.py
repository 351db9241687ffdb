"""`CompressionConfig`: how one class of tensor is quantized (FlexGen's group-wise settings).

Settings only, without torch, so that the Hydra app checks a configuration before anything
heavy is imported (`quantization.compression` holds the quantizer).
"""

from __future__ import annotations

from dataclasses import dataclass

from flexeval.errors import FlexevalError

BITS = (2, 3, 4, 8)
FITS = ("minmax", "mse", "gptq")
KERNELS = ("dequantize", "int4mm")
INT4MM_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel takes


@dataclass(frozen=True)
class CompressionConfig:
    num_bits: int = 4
    group_size: int = 64
    group_dim: int = 0  # the dimension that groups run along (weights: 0, FlexGen's default)
    # "minmax": each group's grid spans its values, every value within half a step (FlexGen's);
    # "mse": of the grids spanning the min-max range shrunk toward zero by each of `compression.CLIP_RATIOS`,
    # each group takes the one with the least squared error: outliers are clipped, the rest
    # get finer steps; "gptq": weight matrices' codes fitted to the model's inputs on min-max
    # grids stored in 16 bits (see `quantization.gptq`; anything it does not fit is min-max rounded
    # on such grids)
    fit: str = "minmax"
    # how a weight matrix is multiplied: "dequantize": into a copy in the model's dtype first;
    # "int4mm": its codes are stored in the tiles of torch's int4 CPU kernel, which decoding
    # steps multiply as they are (`quantization.int4mm`); prefills still dequantize
    kernel: str = "dequantize"

    def __post_init__(self) -> None:
        if self.num_bits not in BITS:
            raise FlexevalError(f"compression: num_bits must be one of {BITS}, got {self.num_bits!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise FlexevalError(f"compression: group_size must be a positive integer, got {self.group_size!r}")
        if not isinstance(self.group_dim, int) or isinstance(self.group_dim, bool):
            raise FlexevalError(f"compression: group_dim must be an integer, got {self.group_dim!r}")
        if self.fit not in FITS:
            raise FlexevalError(f"compression: fit must be one of {FITS}, got {self.fit!r}")
        if self.kernel not in KERNELS:
            raise FlexevalError(f"compression: kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.tiled and (self.num_bits != 4 or self.group_size not in INT4MM_GROUP_SIZES or self.group_dim != 1):
            raise FlexevalError(
                "compression: kernel int4mm multiplies 4-bit codes in groups of "
                f"{', '.join(map(str, INT4MM_GROUP_SIZES))} along the input dimension (group_dim 1); got "
                f"num_bits={self.num_bits}, group_size={self.group_size}, group_dim={self.group_dim}"
            )

    @property
    def levels(self) -> int:
        return 2**self.num_bits - 1

    @property
    def tiled(self) -> bool:
        """Whether codes are stored in the int4 kernel's tiles (`pack_tiles`) instead of by rows."""
        return self.kernel == "int4mm"
