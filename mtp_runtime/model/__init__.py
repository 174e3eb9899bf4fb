"""The network: DeepSeek-V2/V3 trunk (MLA + DeepSeekMoE) and the MTP modules."""

from .transformer import DeepseekForCausalLM

__all__ = ["DeepseekForCausalLM"]
