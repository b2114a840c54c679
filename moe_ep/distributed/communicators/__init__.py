"""One communicator per transport, behind `DeviceCommunicatorBase` (see base.py)."""

from moe_ep.distributed.communicators.base import DeviceCommunicatorBase
from moe_ep.distributed.communicators.cuda import CudaCommunicator
from moe_ep.distributed.communicators.gloo import GlooCommunicator, TorchDistributedCommunicator
from moe_ep.distributed.communicators.shm import SharedMemoryCommunicator

__all__ = [
    "CudaCommunicator",
    "DeviceCommunicatorBase",
    "GlooCommunicator",
    "SharedMemoryCommunicator",
    "TorchDistributedCommunicator",
]
