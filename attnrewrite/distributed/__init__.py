"""Context parallelism for every attention kind, on ``torch.distributed``.

``attnrewrite.distributed.context_parallel(mesh, buffers=..., buffer_seq_dims=...)`` has the signature
and the load-balanced sharding of ``torch.distributed.tensor.experimental.context_parallel``; inside it
SDPA and attnrewrite's ops compute the context-parallel result (:mod:`.manager`, :mod:`.kinds`).
attnrewrite's ops refuse to run inside torch's own manager, which would feed them a shard.
"""

from attnrewrite.distributed.layout import (
    local_positions,
    restore_indices,
    shard_indices,
)
from attnrewrite.distributed.manager import AllGatherFallback, context_parallel, context_parallel_unshard

__all__ = ["AllGatherFallback", "context_parallel", "context_parallel_unshard", "local_positions", "restore_indices", "shard_indices"]
