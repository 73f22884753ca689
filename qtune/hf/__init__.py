"""transformers + peft integration: QuantConfig and its quantizer, checkpoints, training prep."""

from .checkpoint import export_bitsandbytes, from_pretrained
from .config import QuantConfig
from .quantizer import QtuneHfQuantizer, register
from .training import prepare_for_training

register()

__all__ = ["QtuneHfQuantizer", "QuantConfig", "export_bitsandbytes", "from_pretrained", "prepare_for_training"]
