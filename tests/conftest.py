"""Without a GPU, the Triton kernel tests run through Triton's interpreter. Triton reads TRITON_INTERPRET when it is
first imported, and other test modules import it indirectly (through Lightning and torch._dynamo), so the switch
is thrown here, before any test module is collected."""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
