"""Helpers shared by the codec tests."""
import numpy as np


def gguf_tensors(path):
    """{name: (info, data)} with data as gguf's GGUFReader gives it (uint8 [rows, row_bytes] or
    typed floats), memory-mapped. Our header reader: GGUFReader spends 8-20 s on gemma's
    262,144-token vocabulary before it lists a tensor."""
    from q4kdistill.formats.gguf_file import read_header

    return {name: (info, np.memmap(path, info.dtype, "r", info.offset, info.data_shape))
            for name, info in read_header(path, summarize=True).tensors.items()}
