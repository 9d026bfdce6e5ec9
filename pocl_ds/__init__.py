"""pocl_ds: white-box knowledge distillation of LLMs on DeepSpeed with the POCL curriculum."""

from pocl_ds.errors import PoclError

__all__ = ["PoclError"]
__version__ = "0.1.0"
