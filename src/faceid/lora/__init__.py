"""LoRAs: the ecosystem's LoRA files (:mod:`~faceid.lora.files`: read any, write the identity LoRA as one)
and the stack of user LoRAs next to the identity LoRA (:mod:`~faceid.lora.stack`).

The PEFT bookkeeping both rest on (which layers carry an adapter, its weight, undoing an injection)
lives in :mod:`faceid.peft_adapters`, shared with the identity adapter.
"""

from __future__ import annotations

from .files import LAYOUTS, LoraFile, identity_lora_state_dict, read_lora, save_lora
from .stack import LoadedLora, LoraStack

__all__ = ["LAYOUTS", "LoadedLora", "LoraFile", "LoraStack", "identity_lora_state_dict", "read_lora", "save_lora"]
