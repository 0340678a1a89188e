"""Parameter-efficient (PET) modules injected into an unmodified timm model by module path (peft style).

Modules: :class:`Adapter` (bottleneck, parallel or sequential, beside attention or MLP), :class:`LoRA` /
:class:`KVLoRA` (low-rank deltas on a Linear or on the K/V slices of a fused qkv), :class:`Prefix` (learned key/value
tokens with LAE's compensation) in :class:`PrefixAttention`. Each is described by a spec (:class:`AdapterSpec`,
:class:`LoRASpec`, :class:`PrefixSpec`) and added with :func:`inject`; prompt pools with learnable keys and fed input
prompts / per-sample prefixes (:mod:`cl.peft.prompt`, L2P and DualPrompt); see :mod:`cl.peft.inject` for the wrapper
design and the helpers (trainable marking, state dicts, active adapters, copies and EMA).

Used by ``strategies/lae.py`` (LAE, ICCV'23), ``strategies/sema.py`` (SEMA, CVPR'25), ``strategies/l2p.py`` and
``strategies/dualprompt.py``.
"""

from cl.peft.adapter import Adapter, AdapterSpec, Scale, io_dims
from cl.peft.inject import (
    PET_KEY,
    InputTap,
    ParallelWrapper,
    PETSpec,
    PETWrapper,
    SequentialWrapper,
    active_adapters,
    adapter_names,
    copy_adapter,
    ema_update_,
    inject,
    is_pet_name,
    load_pet_state_dict,
    mark_only_pet_trainable,
    params_to_buffers_,
    pet_named_parameters,
    pet_parameters,
    pet_state_dict,
    remove,
    set_active,
    wrappers,
)
from cl.peft.lora import KVLoRA, LoRA, LoRASpec
from cl.peft.prefix import AttentionPrefixSpec, Prefix, PrefixAttention, PrefixSpec
from cl.peft.prompt import FedPrefix, FedPrefixSpec, PromptInput, PromptInputSpec, PromptPool, feed, l2_normalize

__all__ = [
    "PET_KEY", "PETSpec", "PETWrapper", "ParallelWrapper", "SequentialWrapper", "InputTap", "PrefixAttention",
    "Adapter", "AdapterSpec", "Scale", "io_dims", "LoRA", "KVLoRA", "LoRASpec", "AttentionPrefixSpec",
    "Prefix", "PrefixSpec",
    "inject", "remove", "wrappers", "adapter_names", "is_pet_name", "pet_parameters", "pet_named_parameters",
    "mark_only_pet_trainable", "pet_state_dict", "load_pet_state_dict", "set_active", "active_adapters",
    "copy_adapter", "ema_update_", "params_to_buffers_",
    "PromptPool", "PromptInput", "PromptInputSpec", "FedPrefix", "FedPrefixSpec", "feed", "l2_normalize",
]
