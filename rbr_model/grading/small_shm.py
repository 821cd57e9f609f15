"""vLLM's worker message queue sized for a small /dev/shm, such as Docker's default 64 MiB.

Each vLLM engine on the CPU runs its model in a worker process and talks to it through two shared-memory ring
buffers of 10 chunks: the scheduler's queue (`VLLM_MQ_MAX_CHUNK_BYTES_MB`, 16 MiB chunks) and the worker's reply
queue (24 MiB chunks, not configurable): about 400 MiB of /dev/shm per engine, so a container started without
`--shm-size` cannot start one. A message larger than a chunk is not lost: vLLM sends it over its socket instead.

vLLM imports the class below in its worker process (engine argument `worker_extension_cls`) before that process
makes its reply queue; importing this module there gives the reply queue the chunk size of the scheduler's queue.
`rbr_model.grading.vllm_engine.cpu_engine_env` asks for it only where /dev/shm is too small for the defaults.
"""

from __future__ import annotations

from vllm import envs
from vllm.distributed.device_communicators.shm_broadcast import MessageQueue


def _shrink_reply_queue() -> None:
    """The default chunk size of every queue this process makes becomes `VLLM_MQ_MAX_CHUNK_BYTES_MB`."""
    init = MessageQueue.__init__
    names = init.__code__.co_varnames[init.__code__.co_argcount - len(init.__defaults__):init.__code__.co_argcount]
    defaults = dict(zip(names, init.__defaults__, strict=True))
    if "max_chunk_bytes" not in defaults:  # a vLLM whose queue has changed shape: keep its defaults
        return
    defaults["max_chunk_bytes"] = envs.VLLM_MQ_MAX_CHUNK_BYTES_MB * 1024 * 1024
    init.__defaults__ = tuple(defaults.values())


_shrink_reply_queue()


class SmallShmQueues:
    """Adds nothing to the worker: naming it makes vLLM import this module in the worker process."""
