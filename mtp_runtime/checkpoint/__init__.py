"""Reading and writing HF-layout safetensors checkpoints of DeepSeek-V2/V3 models.

Raw (checkpoint) names differ from ours for routed experts and MTP modules (see `names.py`).
FP8 weights (`float8_e4m3fn` plus a `<name>_scale_inv` per 128x128 block) are dequantized at load.

* `files.py`: opening a folder (one file or index-listed shards) and reading the headers.
* `names.py`: raw <-> our name mapping.
* `plan.py`: matching raw tensors to the expected names, reporting every mismatch at once.
* `load.py`: reading the planned tensors into a state dict.
* `fp8.py`: blockwise FP8 quantization and dequantization.
* `save.py`: writing a state dict in the HF layout.
* `model_folder.py`: a whole model folder: config.json once, the MTP layout it promises, the weights in a model.
"""

from .files import INDEX_FILE, SINGLE_FILE, CheckpointFiles, TensorInfo
from .fp8 import DEFAULT_BLOCK_SIZE, FP8_DTYPE, FP8_MAX, dequantize_fp8, quantize_fp8, weight_block_size
from .load import FP32_NAMES, load_state_dict
from .model_folder import MTPLayout, ModelFolder, load_model, mtp_layout, open_folder
from .names import EMBED, LM_HEAD, SCALE_SUFFIX
from .plan import MAX_LISTED
from .save import save_checkpoint

__all__ = [
    "DEFAULT_BLOCK_SIZE", "EMBED", "FP32_NAMES", "FP8_DTYPE", "FP8_MAX", "INDEX_FILE", "LM_HEAD", "MAX_LISTED",
    "SCALE_SUFFIX", "SINGLE_FILE", "CheckpointFiles", "MTPLayout", "ModelFolder", "TensorInfo", "dequantize_fp8",
    "load_model", "load_state_dict", "mtp_layout", "open_folder", "quantize_fp8", "save_checkpoint",
    "weight_block_size",
]
