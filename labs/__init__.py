"""Shared scenery for the DP-vs-DDP lab.

The numbered scripts at the top of the repository are the lesson; this package holds
everything that is the same in steps 02, 03 and 04 (data, models, the training loop,
measurement, result files) and the report of step 05. Imports go one way: the scripts
import ``labs``; nothing here imports a script, and ``labs.train`` knows nothing of
DataParallel or DistributedDataParallel.
"""

__version__ = "0.1.0"
