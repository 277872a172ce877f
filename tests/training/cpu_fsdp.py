"""Test-only: Lightning's FSDPStrategy on CPU processes (gloo).

Lightning refuses `accelerator=cpu` for FSDP (by the strategy's exact type), hands FSDP no device on the
CPU, and gathers full state dicts with `offload_to_cpu=True`, which on CPU tensors crashes torch's FSDP
(the "offloaded" copy aliases freed shard storage). torch's FSDP itself runs on CPU with `device_id=cpu`
and no offload; everything else here is Lightning's strategy.
"""
import lightning.pytorch.strategies.fsdp as lightning_fsdp
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from gemma_fusion.core.config import Buildable


def _full_state_dict_context(module, world_size: int, rank0_only: bool = True):
    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


lightning_fsdp._get_full_state_dict_context = _full_state_dict_context


class CPUFSDPStrategy(FSDPStrategy, Buildable):  # Buildable: a config may name it (core/config.py's policy)
    def _setup_model(self, model):
        return FSDP(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)
