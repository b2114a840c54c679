"""Contract models of the GPU vendor EP libraries, for testing adapters on CPU.

**These are contract models, not the vendor libraries.** Each one reproduces the observable
behaviour of a vendor's Python API, written from its documentation and sources, on CPU tensors
(standing in for CUDA ones) over a gloo process group: argument checks and their exception
types, shapes, dtypes, receive layouts, counts, handles, weighted versus unweighted combine,
and the limits. A moe_ep adapter installed against a model (see :mod:`.install`) runs
unchanged; passing proves the adapter uses the API as documented, never that the CUDA kernels
run. Signature checks against the real packages live in :mod:`.signatures`.

* :mod:`.deepep_model`: ``deep_ep`` (sgl-deep-ep 0.1.2.post1 = DeepEP 2.1.0): ``Buffer``
  (normal and low-latency), ``Config``, ``EventOverlap``, ``ElasticBuffer`` (non-expanding).
* :mod:`.pplx_model`: ``pplx_kernels`` (ppl-ai/pplx-kernels 12cecfd): ``AllToAll``, NVSHMEM
  helpers.
* :mod:`.flashinfer_model`: ``flashinfer.moe_ep`` (flashinfer-python 0.7.4):
  ``create_communication`` with the ``nvlink_one_sided`` (MNNVL) backend.

Errors shared by the models (:mod:`._common`): :class:`VendorContractError` (a rule the real
library relies on but does not check), :class:`SimulatedHang` (ranks disagree; the real kernels
would spin), :class:`ModelNotImplementedError` (a real feature left out on purpose).
"""

from moe_ep.testing.vendor_models._common import (
    ModelNotImplementedError,
    SimulatedHang,
    VendorContractError,
    set_order_seed,
)
from moe_ep.testing.vendor_models.install import (
    MODEL_NAMES,
    build_modules,
    installed,
    run_with_models,
)

__all__ = [
    "MODEL_NAMES",
    "ModelNotImplementedError",
    "SimulatedHang",
    "VendorContractError",
    "build_modules",
    "installed",
    "run_with_models",
    "set_order_seed",
]
