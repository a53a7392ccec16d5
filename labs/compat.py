"""What differs between the PyTorch releases the lab supports (2.4 and newer), in one
place, so the rest of the code is written against one API."""

from __future__ import annotations

import torch

# torch.OutOfMemoryError arrived in 2.5; before it, CUDA's was the only one (and the same
# class: the new name is an alias).
OutOfMemoryError = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError

# Rendezvous failures (a port in use, an address that does not answer) raise this since
# 2.2; on any release without it the lab only loses its one-line message for them.
DistNetworkError = getattr(torch.distributed, "DistNetworkError", RuntimeError)
